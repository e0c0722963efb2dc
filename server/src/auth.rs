//! Bearer-token authentication: HS256 JWTs whose `sub` is the user id and
//! whose `scope` (space-separated) may grant `presence.admin`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::api::error::ApiError;

pub const ADMIN_SCOPE: &str = "presence.admin";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    scope: String,
}

/// Who is calling, as proven by the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub admin: bool,
}

pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    max_id_bytes: usize,
}

impl Authenticator {
    pub fn new(secret: &str, max_id_bytes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_id_bytes,
        }
    }

    pub fn verify(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing authorization metadata".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthenticated("authorization must be `Bearer <token>`".into())
            })?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| ApiError::Unauthenticated(format!("invalid token: {e}")))?
            .claims;
        if claims.sub.is_empty() || claims.sub.len() > self.max_id_bytes {
            return Err(ApiError::Unauthenticated(
                "the token's subject is not a valid user id".into(),
            ));
        }
        Ok(Caller {
            admin: claims.scope.split_whitespace().any(|s| s == ADMIN_SCOPE),
            user_id: claims.sub,
        })
    }
}

/// Mints a token for `user_id`, valid for `ttl`.
pub fn mint(secret: &str, user_id: &str, admin: bool, ttl: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: user_id.to_owned(),
        iat: now,
        exp: now + ttl.as_secs(),
        scope: if admin {
            ADMIN_SCOPE.to_owned()
        } else {
            String::new()
        },
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encoding HS256 claims cannot fail")
}
