//! Writes the gateway's own answers: JSON errors (DESIGN.md §4) and the health answer.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::error::GatewayError;

/// Sends `error` as the JSON body of DESIGN.md §4.
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

async fn send(session: &mut Session, mut header: ResponseHeader, body: Bytes) -> Result<()> {
    header.insert_header(CONTENT_TYPE, "application/json")?;
    header.insert_header(CONTENT_LENGTH, body.len())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
