//! Bearer-token authentication: HS256 JWTs whose `sub` is the user id and
//! whose `scope` (space-separated) may grant `presence.admin`.
//!
//! The rules, all tested below: `exp` and `sub` are required; `iat` is
//! optional (RFC 7519) but a token issued in the future is refused; `nbf` is
//! honoured; `iss` and `aud` are checked when `--jwt-issuer` and
//! `--jwt-audience` are set; `sub` must be a valid user id. Every clock check
//! allows [`LEEWAY_SECS`] of skew. Clients only ever read "invalid token" or
//! "token expired": why a token was refused is logged, never sent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::api::error::ApiError;

pub const ADMIN_SCOPE: &str = "presence.admin";

/// Clock skew tolerated between the token's issuer and this node, in seconds.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    // `iss` and `aud` are checked by `jsonwebtoken` from the raw claims
    // (where `aud` may also be a list); they are only written here.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    scope: String,
}

/// Who is calling, as proven by the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub admin: bool,
    /// When the token stops being accepted (its `exp` plus the leeway), in
    /// Unix seconds: streams opened with it end then.
    pub expires_at_secs: u64,
}

impl Caller {
    /// How long the token is still accepted, from now.
    pub fn valid_for(&self) -> Duration {
        Duration::from_secs(self.expires_at_secs.saturating_sub(unix_now()))
    }
}

pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    max_id_bytes: usize,
}

impl Authenticator {
    pub fn new(secret: &str, max_id_bytes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // Without a configured audience, a token naming one is refused: it
        // was meant for another service.
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_id_bytes,
        }
    }

    /// Requires `iss` to be `issuer` (`--jwt-issuer`).
    pub fn with_issuer(mut self, issuer: Option<&str>) -> Self {
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            self.require("iss");
        }
        self
    }

    /// Requires `aud` to name `audience` (`--jwt-audience`).
    pub fn with_audience(mut self, audience: Option<&str>) -> Self {
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.require("aud");
        }
        self
    }

    fn require(&mut self, claim: &str) {
        self.validation
            .required_spec_claims
            .insert(claim.to_owned());
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
        self.verify_token(token)
    }

    /// Checks one token. The error a client sees says only whether the token
    /// expired; the reason it was refused is logged at debug level.
    pub fn verify_token(&self, token: &str) -> Result<Caller, ApiError> {
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => data.claims,
            Err(error) if *error.kind() == ErrorKind::ExpiredSignature => {
                return Err(ApiError::Unauthenticated("token expired".into()));
            }
            Err(error) => return Err(invalid(&error.to_string())),
        };
        if let Some(iat) = claims.iat
            && iat > unix_now().saturating_add(LEEWAY_SECS)
        {
            return Err(invalid("issued in the future"));
        }
        let sub = &claims.sub;
        if sub.is_empty() || sub.len() > self.max_id_bytes || sub.chars().any(char::is_control) {
            return Err(invalid("the subject is not a valid user id"));
        }
        Ok(Caller {
            admin: claims.scope.split_whitespace().any(|s| s == ADMIN_SCOPE),
            user_id: claims.sub,
            expires_at_secs: claims.exp.saturating_add(LEEWAY_SECS),
        })
    }
}

fn invalid(reason: &str) -> ApiError {
    tracing::debug!(reason, "token refused");
    ApiError::Unauthenticated("invalid token".into())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Mints a token for `user_id`, valid for `ttl`.
pub fn mint(secret: &str, user_id: &str, admin: bool, ttl: Duration) -> String {
    mint_for(secret, user_id, admin, ttl, None, None)
}

/// Mints a token for `user_id`, valid for `ttl`, naming `issuer` and
/// `audience` when given (what `--jwt-issuer` and `--jwt-audience` require).
pub fn mint_for(
    secret: &str,
    user_id: &str,
    admin: bool,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> String {
    let now = unix_now();
    let claims = Claims {
        sub: user_id.to_owned(),
        iat: Some(now),
        exp: now + ttl.as_secs(),
        iss: issuer.map(str::to_owned),
        aud: audience.map(str::to_owned),
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn sign(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::new(SECRET, 128)
    }

    fn message(result: Result<Caller, ApiError>) -> String {
        match result {
            Ok(caller) => panic!("accepted as {caller:?}"),
            Err(ApiError::Unauthenticated(message)) => message,
            Err(other) => panic!("not UNAUTHENTICATED: {other:?}"),
        }
    }

    #[test]
    fn a_minted_token_names_its_user_and_scope() {
        let caller = auth()
            .verify_token(&mint(SECRET, "alice", true, Duration::from_secs(60)))
            .unwrap();
        assert_eq!((caller.user_id.as_str(), caller.admin), ("alice", true));
        assert!(caller.valid_for() > Duration::from_secs(60));
    }

    #[test]
    fn a_token_without_iat_is_accepted() {
        let token = sign(json!({"sub": "alice", "exp": unix_now() + 60}));
        assert_eq!(auth().verify_token(&token).unwrap().user_id, "alice");
    }

    #[test]
    fn a_token_issued_in_the_future_is_refused_beyond_the_leeway() {
        let now = unix_now();
        let future = sign(json!({"sub": "alice", "exp": now + 600, "iat": now + 120}));
        assert_eq!(message(auth().verify_token(&future)), "invalid token");
        let skewed = sign(json!({"sub": "alice", "exp": now + 600, "iat": now + 2}));
        assert!(auth().verify_token(&skewed).is_ok());
    }

    #[test]
    fn a_token_before_its_nbf_is_refused() {
        let now = unix_now();
        let early = sign(json!({"sub": "alice", "exp": now + 600, "nbf": now + 120}));
        assert_eq!(message(auth().verify_token(&early)), "invalid token");
        let ready = sign(json!({"sub": "alice", "exp": now + 600, "nbf": now - 1}));
        assert!(auth().verify_token(&ready).is_ok());
    }

    #[test]
    fn an_expired_token_says_so_and_nothing_more() {
        let token = sign(json!({"sub": "alice", "exp": unix_now() - 60}));
        assert_eq!(message(auth().verify_token(&token)), "token expired");
    }

    #[test]
    fn malformed_claims_get_a_generic_message_without_parser_detail() {
        let now = unix_now();
        for claims in [
            json!({"sub": "alice", "exp": now + 60, "iat": "yesterday"}),
            json!({"sub": 42, "exp": now + 60}),
            json!({"exp": now + 60}),
            json!({"sub": "alice"}),
        ] {
            assert_eq!(message(auth().verify_token(&sign(claims))), "invalid token");
        }
        assert_eq!(message(auth().verify_token("not.a.jwt")), "invalid token");
        let other_key = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now + 60}),
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!"),
        )
        .unwrap();
        assert_eq!(message(auth().verify_token(&other_key)), "invalid token");
    }

    #[test]
    fn the_subject_is_validated_like_any_user_id() {
        let now = unix_now();
        for sub in [
            String::new(),
            "a".repeat(129),
            "ali\nce".into(),
            "bob\u{7f}".into(),
        ] {
            let token = sign(json!({"sub": sub, "exp": now + 60}));
            assert_eq!(
                message(auth().verify_token(&token)),
                "invalid token",
                "{sub:?}"
            );
        }
        let longest = sign(json!({"sub": "a".repeat(128), "exp": now + 60}));
        assert!(auth().verify_token(&longest).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let now = unix_now();
        let strict = || {
            auth()
                .with_issuer(Some("https://id.example.com"))
                .with_audience(Some("presence"))
        };
        let good = sign(json!({"sub": "alice", "exp": now + 60,
            "iss": "https://id.example.com", "aud": "presence"}));
        assert!(strict().verify_token(&good).is_ok());
        let listed = sign(json!({"sub": "alice", "exp": now + 60,
            "iss": "https://id.example.com", "aud": ["presence", "chat"]}));
        assert!(strict().verify_token(&listed).is_ok());
        for claims in [
            json!({"sub": "alice", "exp": now + 60, "aud": "presence"}),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://id.example.com"}),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://evil.example.com", "aud": "presence"}),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://id.example.com", "aud": "billing"}),
        ] {
            assert_eq!(
                message(strict().verify_token(&sign(claims))),
                "invalid token"
            );
        }
        let minted = mint_for(
            SECRET,
            "alice",
            false,
            Duration::from_secs(60),
            Some("https://id.example.com"),
            Some("presence"),
        );
        assert!(strict().verify_token(&minted).is_ok());
    }

    #[test]
    fn without_a_configured_audience_a_token_for_another_service_is_refused() {
        let token = sign(json!({"sub": "alice", "exp": unix_now() + 60, "aud": "billing"}));
        assert_eq!(message(auth().verify_token(&token)), "invalid token");
    }
}
