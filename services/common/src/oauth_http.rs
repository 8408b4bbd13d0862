//! The `oauth2` crate's HTTP client over reqwest 0.13 (the crate's own is built for reqwest
//! 0.12). [`send`] also keeps the HTTP status of failures the crate would otherwise only see
//! as an unparseable body (a 503 page, a 429 with `Retry-After`).

use oauth2::{HttpRequest, HttpResponse};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Why a token request failed at the HTTP level.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server answered a status the token endpoint does not use for OAuth2 errors
    /// (429, 5xx): kept so that the failure is classified as a limit or an outage.
    #[error("http status {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("http request failed")]
    Transport(#[source] reqwest::Error),
}

/// Parses `Retry-After` given in seconds (the HTTP-date form is not used by these providers).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Sends one token request with `http`.
///
/// # Errors
/// [`HttpError::Status`] for 429 and 5xx, [`HttpError::Transport`] when no answer came.
pub async fn send(http: &reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request).map_err(HttpError::Transport)?;
    let response = http.execute(request).await.map_err(HttpError::Transport)?;
    let status = response.status();
    if status.as_u16() == 429 || status.is_server_error() {
        return Err(HttpError::Status {
            status: status.as_u16(),
            retry_after: retry_after(response.headers()),
        });
    }
    let mut answer = oauth2::http::Response::builder().status(status.as_u16());
    for (name, value) in response.headers() {
        answer = answer.header(name.as_str(), value.as_bytes());
    }
    let body = response.bytes().await.map_err(HttpError::Transport)?;
    answer.body(body.to_vec()).map_err(|_| HttpError::Status {
        status: status.as_u16(),
        retry_after: None,
    })
}

/// The HTTP client the `oauth2` crate sends token requests with: [`send`] over reqwest 0.13.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a>(pub &'a reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Http<'_> {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(self.0, request))
    }
}
