//! Writes the gateway's own answers: JSON errors (shaped by `crate::error`) and the health answer.

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::error::GatewayError;

/// The request id header: taken from the caller or generated, sent to finX, returned.
pub const REQUEST_ID: &str = "x-request-id";

/// Copies the request's id (set in `request_filter`) onto an answer.
pub fn echo_request_id(session: &Session, header: &mut ResponseHeader) -> Result<()> {
    if let Some(id) = session.req_header().headers.get(REQUEST_ID) {
        header.insert_header(REQUEST_ID, id.clone())?;
    }
    Ok(())
}

/// Sends `error` as its JSON body (`{"error": {"code", "message"}}`).
pub async fn send_error(session: &mut Session, error: &GatewayError) -> Result<()> {
    let mut header = ResponseHeader::build(error.status(), Some(5))?;
    if let Some(seconds) = error.retry_after_secs() {
        header.insert_header(RETRY_AFTER, seconds)?;
    }
    if let Some(challenge) = error.www_authenticate() {
        header.insert_header(WWW_AUTHENTICATE, challenge)?;
    }
    send(session, header, error.body()).await
}

/// Sends a small JSON answer of the gateway's own.
pub async fn send_json(
    session: &mut Session,
    status: StatusCode,
    body: &'static str,
) -> Result<()> {
    let header = ResponseHeader::build(status, Some(3))?;
    send(session, header, Bytes::from_static(body.as_bytes())).await
}

/// Sends a JSON value.
pub async fn send_json_value(
    session: &mut Session,
    status: StatusCode,
    body: &serde_json::Value,
) -> Result<()> {
    let header = ResponseHeader::build(status, Some(3))?;
    send(session, header, Bytes::from(body.to_string())).await
}

/// Sends a `302 Found` to `location`.
pub async fn send_redirect(session: &mut Session, location: &str) -> Result<()> {
    let mut header = ResponseHeader::build(StatusCode::FOUND, Some(4))?;
    header.insert_header(LOCATION, location)?;
    header.insert_header(CACHE_CONTROL, "no-store")?;
    header.insert_header(CONTENT_LENGTH, 0)?;
    echo_request_id(session, &mut header)?;
    session.write_response_header(Box::new(header), true).await
}

/// Sends finX's answer to a request the gateway made itself, as finX gave it.
pub async fn send_upstream_answer(
    session: &mut Session,
    status: u16,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(3))?;
    if let Some(content_type) = content_type {
        header.insert_header(CONTENT_TYPE, content_type)?;
    }
    header.insert_header(CONTENT_LENGTH, body.len())?;
    echo_request_id(session, &mut header)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

async fn send(session: &mut Session, mut header: ResponseHeader, body: Bytes) -> Result<()> {
    header.insert_header(CONTENT_TYPE, "application/json")?;
    header.insert_header(CONTENT_LENGTH, body.len())?;
    echo_request_id(session, &mut header)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
