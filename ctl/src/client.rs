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
        Code::PermissionDenied | Code::Unauthenticated => {
            " (check that --cert is an operator certificate of this fleet)"
        }
        Code::Unavailable => " (is the controller running and reachable?)",
        _ => "",
    };
    anyhow::anyhow!("{what}: {}{hint}", status.message())
}

/// Unwraps a response, naming the call on failure.
pub fn call<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| status_error(what, &s))
}
