//! The agent's API over HTTP, for the CLI.

use std::time::Duration;

use nubis_api::ApiError;
use serde_json::Value;

/// Errors of a CLI request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("{code} ({status}): {message}{field}")]
    Api {
        status: u16,
        code: String,
        message: String,
        field: String,
    },
    #[error("unexpected answer from the agent ({status}): {body}")]
    Unexpected { status: u16, body: String },
    #[error("cannot encode the request: {0}")]
    Encode(#[from] serde_json::Error),
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        // reqwest sets up TLS even for http:// URLs, with the process's
        // default provider.
        nubis_agent::peer_tls::install_default_provider();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|source| ClientError::Connect {
                url: base.to_string(),
                source,
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// Sends a request; returns the body (JSON, or text as a JSON string).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (_, text) = self.raw(method, path, body)?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends a request with `body` (one of the API's request types) as JSON.
    pub fn send_json<T: serde::Serialize>(
        &self,
        method: &str,
        path: &str,
        body: &T,
    ) -> Result<Value, ClientError> {
        self.call(method, path, Some(&serde_json::to_value(body)?))
    }

    /// Sends `body` as JSON and hands each line of the answer to `on_line`
    /// as it arrives (a newline-delimited JSON stream).
    pub fn stream_lines<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
        mut on_line: impl FnMut(&str) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        use std::io::BufRead;
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body)?);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(api_error(status, response.text().unwrap_or_default()));
        }
        for line in std::io::BufReader::new(response).lines() {
            let line = line.map_err(|err| ClientError::Unexpected {
                status,
                body: format!("the answer broke off: {err}"),
            })?;
            if !line.is_empty() {
                on_line(&line)?;
            }
        }
        Ok(())
    }

    /// Streams a local file as a request body (PUT).
    pub fn upload(&self, path: &str, local: &std::path::Path) -> Result<Value, ClientError> {
        let file = std::fs::File::open(local).map_err(|err| ClientError::Unexpected {
            status: 0,
            body: format!("cannot read {}: {err}", local.display()),
        })?;
        let url = format!("{}{path}", self.base);
        let request = self.http.put(&url).body(reqwest::blocking::Body::new(file));
        let (_, text) = self.send(request, &url)?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends a request; returns the status and the body text, or the API
    /// error.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), ClientError> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        self.send(request, &url)
    }

    /// Adds the token, sends, and turns an HTTP error into the API's error.
    fn send(
        &self,
        mut request: reqwest::blocking::RequestBuilder,
        url: &str,
    ) -> Result<(u16, String), ClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().map_err(|source| ClientError::Connect {
            url: url.to_string(),
            source,
        })?;
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        if status >= 400 {
            return Err(api_error(status, text));
        }
        Ok((status, text))
    }
}

/// The client error for an HTTP error reply.
fn api_error(status: u16, text: String) -> ClientError {
    match serde_json::from_str::<ApiError>(&text) {
        Ok(error) => ClientError::Api {
            status,
            code: serde_json::to_value(error.error.code)
                .ok()
                .and_then(|code| code.as_str().map(str::to_string))
                .unwrap_or_default(),
            message: error.error.message,
            field: error
                .error
                .field
                .map(|field| format!(" (field: {field})"))
                .unwrap_or_default(),
        },
        Err(_) => ClientError::Unexpected { status, body: text },
    }
}
