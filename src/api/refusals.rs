//! Refused calls in the log: this wrapper around a gRPC service logs every call answered with
//! a non-OK status — the caller's identity, the method, the gRPC code and the stable dccsign
//! code (`2-60-…`), never the request or the rest of the message, so no UVCI and no payload
//! reaches the log. Authorization refusals (PERMISSION_DENIED) are warnings, the rest
//! information. The issuance pipeline also logs each outcome itself, with the request id; this
//! adds what is refused before it (authorization, request checks, limits).
//!
//! It reads the status from the response headers, where a unary call's refusal is (a
//! "trailers-only" response); a refusal at the end of a stream, in its trailers, is not seen.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::tls::Peer;

/// Wraps a gRPC service so that its refused calls are logged (see the module).
#[derive(Debug, Clone)]
pub struct LogRefusals<S>(pub S);

impl<S: NamedService> NamedService for LogRefusals<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for LogRefusals<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().to_string();
        let client = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.clone());
        let response = self.0.call(req);
        Box::pin(async move {
            let response = response.await?;
            let headers = response.headers();
            let refused = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .filter(|c| *c != 0);
            if let Some(status) = refused {
                let code = headers
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .and_then(stable_code)
                    .unwrap_or_else(|| "-".into());
                let grpc = tonic::Code::from_i32(status);
                let client = client.as_deref().unwrap_or("-");
                if matches!(
                    grpc,
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) {
                    // A caller reaching for what its role or its certificates do not allow.
                    tracing::warn!(client, method = %method, grpc_code = ?grpc, code = %code,
                        "call refused");
                } else {
                    tracing::info!(client, method = %method, grpc_code = ?grpc, code = %code,
                        "call refused");
                }
                metrics::counter!("dccsign_calls_refused_total", "method" => method,
                    "code" => code)
                .increment(1);
            }
            Ok(response)
        })
    }
}

/// The stable code at the end of a status message (`… [2-60-8002]`; `[` and `]` may arrive
/// percent-encoded).
fn stable_code(message: &str) -> Option<String> {
    let message = message.replace("%5B", "[").replace("%5D", "]");
    let rest = &message[message.rfind('[')? + 1..];
    let code = &rest[..rest.find(']')?];
    (code.starts_with("2-60-") && code.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
        .then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::stable_code;

    #[test]
    fn the_stable_code_is_read_from_the_end_of_the_message() {
        assert_eq!(
            stable_code("no certificate with this UVCI [2-60-8002]"),
            Some("2-60-8002".into())
        );
        assert_eq!(
            stable_code("reason: must be one of [a, b] %5B2-60-8001%5D"),
            Some("2-60-8001".into())
        );
        assert_eq!(stable_code("a message [with brackets]"), None);
        assert_eq!(stable_code("no code"), None);
    }
}
