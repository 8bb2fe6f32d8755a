//! The inbox REST calls ([`InboxClient`]): `GET /v1/edge/inbox`, `POST …/accept` and
//! `POST …/decline`, each one request over `tandem-http` with the device token as
//! `Authorization: Bearer`; a non-2xx answer becomes [`InboxError::Api`]. Needs no model.
//! Success answers are read as the API's contract types ([`tandem_openapi::inbox`]) and
//! converted to the device's, which checks ids and tickets.

use hyper::{Method, StatusCode};
use serde::Deserialize;
use tandem_http::HttpError;
use tandem_openapi::inbox as contract;

use super::api::{Accepted, ErrorBody, Inbox, PromptId};
use super::config::InboxConfig;
use crate::error::{ApiCode, InboxError};

/// The inbox calls on their own (no model needed). [`EdgeClient`](crate::EdgeClient) offers the same calls.
#[derive(Clone, Debug)]
pub struct InboxClient {
    cfg: InboxConfig,
}

impl InboxClient {
    pub fn new(cfg: InboxConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &InboxConfig {
        &self.cfg
    }

    /// `GET /v1/edge/inbox`.
    pub async fn list(&self) -> Result<Inbox, InboxError> {
        let res = self.call(Method::GET, "/v1/edge/inbox").await?;
        decode::<contract::Inbox>(&res.body)?.try_into()
    }

    /// `POST /v1/edge/inbox/{id}/accept`. The answer must name the same prompt.
    pub async fn accept(&self, id: &PromptId) -> Result<Accepted, InboxError> {
        let res = self
            .call(Method::POST, &format!("/v1/edge/inbox/{id}/accept"))
            .await?;
        // Converted at once: the contract type's `Debug` shows the ticket.
        let accepted = Accepted::try_from(decode::<contract::Accepted>(&res.body)?)?;
        if accepted.prompt_id != *id {
            return Err(InboxError::Decode(format!(
                "accepted prompt {id}, but the answer is for prompt {}",
                accepted.prompt_id
            )));
        }
        Ok(accepted)
    }

    /// `POST /v1/edge/inbox/{id}/decline`.
    pub async fn decline(&self, id: &PromptId) -> Result<(), InboxError> {
        self.call(Method::POST, &format!("/v1/edge/inbox/{id}/decline"))
            .await
            .map(drop)
    }

    /// One call; a non-2xx status becomes [`InboxError::Api`].
    async fn call(&self, method: Method, path: &str) -> Result<tandem_http::Response, InboxError> {
        let mut req = tandem_http::Request::new(method.clone(), path);
        req.bearer = Some(self.cfg.token.expose());
        req.headers.push((
            tandem_http::header::ACCEPT,
            tandem_http::header::HeaderValue::from_static("application/json"),
        ));
        req.timeout = self.cfg.timeout;
        req.max_body_bytes = self.cfg.max_response_bytes;
        req.tls = self.cfg.tls.clone();
        req.user_agent = concat!("tandem-edge/", env!("CARGO_PKG_VERSION"));
        let res = tandem_http::send(&self.cfg.api, req)
            .await
            .map_err(|e| match e {
                HttpError::Transport(m) => InboxError::Transport(m),
                HttpError::TooLarge { limit } => InboxError::TooLarge { limit },
                HttpError::Tls(m) => InboxError::Tls(m),
                HttpError::Request(m) => InboxError::Config(m),
            })?;
        tracing::debug!(%method, path, status = res.status.as_u16(), "inbox call");
        if res.status.is_success() {
            Ok(res)
        } else {
            Err(api_error(&res))
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, InboxError> {
    serde_json::from_slice(body).map_err(|e| InboxError::Decode(e.to_string()))
}

fn api_error(res: &tandem_http::Response) -> InboxError {
    let status = res.status;
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&res.body) {
        Ok(b) => (ApiCode::parse(&b.error.code), b.error.message),
        Err(_) => (
            match status {
                StatusCode::UNAUTHORIZED => ApiCode::Unauthorized,
                StatusCode::NOT_FOUND => ApiCode::NotFound,
                StatusCode::CONFLICT => ApiCode::Conflict,
                StatusCode::TOO_MANY_REQUESTS => ApiCode::RateLimited,
                StatusCode::SERVICE_UNAVAILABLE => ApiCode::Unavailable,
                s => ApiCode::Other(format!("http_{}", s.as_u16())),
            },
            status.canonical_reason().unwrap_or("error").to_owned(),
        ),
    };
    InboxError::Api {
        status: status.as_u16(),
        code,
        message,
        retry_after: res.retry_after(),
    }
}
