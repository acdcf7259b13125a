//! The Fleet API client: every fleet command goes through here.

use flotilla_proto::pb::fleet_client::FleetClient;
use tonic::transport::Channel;

use crate::context::Connection;

/// Connects to the controller of `conn`.
pub async fn connect(conn: &Connection) -> anyhow::Result<FleetClient<Channel>> {
    let endpoint = flotilla_common::client::endpoint(&conn.controller, &conn.tls)?;
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the controller at {}: {} (is it running, and are --cacert/--cert/--key from its fleet CA?)",
            conn.controller,
            flotilla_common::client::describe(&e)
        )
    })?;
    Ok(FleetClient::new(channel))
}

/// Turns a failed call into an error that says what to do.
pub fn status_error(what: &str, status: &tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let hint = match status.code() {
        // A role refusal already says which role the call needs.
        Code::PermissionDenied if status.message().contains("needs role") => "",
        Code::PermissionDenied | Code::Unauthenticated => {
            " (check that --cert is an operator certificate of this fleet)"
        }
        Code::Unavailable => " (is the controller running and reachable?)",
        // E.g. the enrollment port, which serves nothing but enrollment.
        Code::Unimplemented => " (this server does not serve it: is --controller the controller's mTLS port?)",
        _ => "",
    };
    let mut detail = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = cause.source();
    }
    let hint = if matches!(status.code(), Code::Unknown | Code::Cancelled | Code::Unavailable)
        && detail.contains("transport error")
    {
        " (the controller closed the connection; if it persists, check that --cert and --key were issued by this fleet's CA: the controller logs the reason)"
    } else {
        hint
    };
    anyhow::anyhow!("{what}: {detail}{hint}")
}

/// Unwraps a response, naming the call on failure.
pub fn call<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner).map_err(|s| status_error(what, &s))
}
