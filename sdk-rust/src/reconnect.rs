//! What a long-lived server stream (a watch, a consumer) does when it
//! breaks: whether to reconnect, after how long, and with a fresh token.

use crate::connector::Connector;
use crate::{Backoff, Error};

/// The reconnect state of one stream.
pub(crate) struct Reconnects {
    backoff: Backoff,
    /// Failed attempts since the stream last worked; drives the backoff.
    failures: u32,
    /// A fresh token was fetched and no stream has worked with it yet.
    refreshed: bool,
    finished: bool,
}

impl Reconnects {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Reconnects {
            backoff,
            failures: 0,
            refreshed: false,
            finished: false,
        }
    }

    /// The stream ended with an error that is not worth retrying.
    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// Waits out the backoff before the next attempt, if the last one failed.
    pub(crate) async fn pause(&self) {
        if self.failures > 0 {
            tokio::time::sleep(self.backoff.delay(self.failures)).await;
        }
    }

    /// The server is serving the stream again: the next failure starts the
    /// backoff from its first step.
    pub(crate) fn served(&mut self) {
        self.failures = 0;
        self.refreshed = false;
    }

    /// After `error` broke the stream (or an attempt to open it) on channel
    /// `generation`: the attempt number and reason to report while
    /// reconnecting, or the error that ends the stream. A refused token is
    /// refreshed once and retried at once; a retryable error moves to the
    /// next endpoint.
    pub(crate) async fn after(
        &mut self,
        connector: &Connector,
        error: Error,
        generation: u64,
        stream: &str,
    ) -> Result<(u32, String), Error> {
        if matches!(error, Error::Unauthenticated(_)) && !self.refreshed {
            match connector.refresh_token().await {
                Ok(true) => {
                    self.refreshed = true;
                    tracing::info!("token refused, reconnecting the {stream} with a fresh one");
                    return Ok((self.failures.max(1), error.to_string()));
                }
                Ok(false) => {}
                Err(refresh) => tracing::warn!(error = %refresh, "fetching a fresh token failed"),
            }
        }
        if !error.is_retryable() {
            self.finished = true;
            return Err(error);
        }
        self.failures = self.failures.saturating_add(1);
        connector.rotate(generation);
        tracing::info!(%error, attempt = self.failures, "{stream} lost, reconnecting");
        Ok((self.failures, error.to_string()))
    }
}
