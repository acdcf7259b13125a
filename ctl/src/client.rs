//! The Fleet API client: every fleet command goes through here, and so does every
//! failure to reach the controller or of a call, turned into one line that says
//! what went wrong and what to do about it.

use flotilla_common::client::{ClientError, describe};
use flotilla_common::tls::TlsError;
use flotilla_common::trace::{METADATA_KEY, TraceParent};
use flotilla_proto::pb::fleet_client::FleetClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::context::Connection;

/// The Fleet client every command uses: each request carries the trace context.
pub type Fleet = FleetClient<InterceptedService<Channel, PropagateTrace>>;

/// Puts the current span's W3C `traceparent` in each request's metadata, so
/// that the controller's span of the call joins flotctl's trace; in a task
/// spawned outside any span (`exec` runs nodes in parallel), the span the
/// client was connected in. Nothing is added when spans are not exported (no
/// `--otlp-endpoint`).
#[derive(Debug, Clone)]
pub struct PropagateTrace {
    connected_in: tracing::Span,
}

impl Interceptor for PropagateTrace {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let parent = TraceParent::current().or_else(|| TraceParent::of(&self.connected_in));
        // A traceparent is hex and dashes, always a valid header value; the
        // parse cannot fail, and a failure would only mean no propagation.
        if let Some(value) = parent.and_then(|t| MetadataValue::try_from(t.to_string()).ok()) {
            request.metadata_mut().insert(METADATA_KEY, value);
        }
        Ok(request)
    }
}

/// Where people look up or change the connection settings; said by most hints.
const CHECK_CONNECTION: &str = "check --controller, or the context's address with `flotctl context ls`";

/// Connects to the controller of `conn`.
pub async fn connect(conn: &Connection) -> anyhow::Result<Fleet> {
    let endpoint = flotilla_common::client::endpoint(&conn.controller, &conn.tls).map_err(endpoint_error)?;
    let channel = endpoint.connect().await.map_err(|e| connect_error(&conn.controller, &describe(&e)))?;
    Ok(FleetClient::with_interceptor(channel, PropagateTrace { connected_in: tracing::Span::current() }))
}

/// A connection that cannot even be set up: an unreadable TLS file or a bad address.
fn endpoint_error(error: ClientError) -> anyhow::Error {
    let hint = match &error {
        ClientError::BadUrl { .. } => {
            "pass --controller https://HOST:PORT, or fix the context: `flotctl context ls` shows it"
        }
        ClientError::Tls(TlsError::Io { .. }) => {
            "check the --cacert, --cert and --key paths, or the context's: `flotctl context ls` shows them"
        }
        ClientError::Tls(TlsError::BadKey { .. }) => "--key must be the PEM private key issued with --cert",
        ClientError::Tls(_) => {
            "--cacert must be the fleet's ca.pem and --cert an operator certificate (PEM) from \
             `flotctl cert issue --user`"
        }
    };
    anyhow::anyhow!("cannot set up the connection to the controller: {error} ({hint})")
}

/// A controller that could not be reached, with what to do for the likely cause.
fn connect_error(controller: &str, detail: &str) -> anyhow::Error {
    anyhow::anyhow!("cannot reach the controller at {controller}: {detail} ({})", connect_hint(detail))
}

/// What to do about a failure to connect, read from the transport's own words
/// (std, hyper and rustls say the cause only in text).
fn connect_hint(detail: &str) -> String {
    let has = |needles: &[&str]| needles.iter().any(|n| detail.contains(n));
    if has(&["Connection refused", "os error 111"]) {
        format!("nothing listens there: is the controller running? {CHECK_CONNECTION}")
    } else if has(&["dns error", "failed to lookup address", "Name or service not known", "nodename nor servname"]) {
        format!("the host name does not resolve: {CHECK_CONNECTION}")
    } else if has(&["timed out", "deadline has elapsed", "Timeout"]) {
        format!("no answer in time: is the address right and does a firewall let the port through? {CHECK_CONNECTION}")
    } else if has(&["Network is unreachable", "No route to host", "Host is unreachable"]) {
        format!("no route to that address from here: {CHECK_CONNECTION}")
    } else if has(&["UnknownIssuer", "unknown issuer", "BadSignature"]) {
        "the controller's certificate is not from the CA in --cacert: use the ca.pem of that controller's fleet"
            .to_owned()
    } else if has(&["NotValidForName", "not valid for name"]) {
        "the controller's certificate does not name this host: connect by a DNS name or IP in its certificate \
         (`flotctl ca init --san` set them)"
            .to_owned()
    } else if has(&["Expired", "expired", "NotValidYet", "not valid yet"]) {
        "a certificate is outside its validity: check this machine's clock, or issue a new one \
         (`flotctl cert issue ... --force`)"
            .to_owned()
    } else if has(&["InvalidContentType", "corrupt message", "wrong version number"]) {
        "that port does not speak TLS: point --controller at the controller's gRPC port, the `listen` address of \
         its config"
            .to_owned()
    } else if has(&["fatal alert", "BadCertificate", "UnknownCA", "CertificateRequired", "DecryptError"]) {
        "the controller refused our certificate: --cert and --key must be an operator certificate issued by \
         this fleet's CA"
            .to_owned()
    } else {
        "is it running, and are --cacert/--cert/--key from its fleet CA?".to_owned()
    }
}

/// Turns a failed call into an error that says what went wrong and what to do.
pub fn status_error(what: &str, status: &tonic::Status) -> anyhow::Error {
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
    match status_hint(what, status.code(), &detail) {
        Some(hint) => anyhow::anyhow!("{what}: {detail} ({hint})"),
        None => anyhow::anyhow!("{what}: {detail}"),
    }
}

/// What to do after `what` failed with `code`; `None` when the controller's own
/// message already says it.
fn status_hint(what: &str, code: tonic::Code, detail: &str) -> Option<String> {
    use tonic::Code;
    // The controller's refusals that name a next step (`flotctl ...`, "ask an admin") need no second one.
    let says_what_to_do = ["flotctl ", ": ask ", "retry", " set ", " config"].iter().any(|s| detail.contains(s));
    let transport = detail.contains("transport error") || detail.contains("connection reset");
    Some(match code {
        _ if says_what_to_do => return None,
        Code::Unknown | Code::Cancelled | Code::Unavailable if transport => {
            "the controller closed the connection; if it persists, check that --cert and --key were issued by this \
             fleet's CA: the controller logs the reason"
                .to_owned()
        }
        Code::Unavailable => format!("is the controller running and reachable? {CHECK_CONNECTION}"),
        Code::PermissionDenied if detail.contains("needs role") => return None,
        Code::PermissionDenied | Code::Unauthenticated => {
            "use an operator certificate of this fleet: `flotctl cert issue --user NAME --role viewer|operator|admin`"
                .to_owned()
        }
        Code::NotFound => match lister(what) {
            Some(ls) => format!("check the name: `{ls}` lists what exists"),
            None => "check the name and try again".to_owned(),
        },
        Code::InvalidArgument | Code::OutOfRange => {
            "correct the value it names and run the command again; --help shows each flag's form".to_owned()
        }
        Code::AlreadyExists => "pick another name, or change the existing one instead".to_owned(),
        Code::FailedPrecondition | Code::Aborted => match lister(what) {
            Some(ls) => format!("the fleet is not in a state that allows this now; `{ls}` shows where it is"),
            None => "the fleet is not in a state that allows this now; try again once that changes".to_owned(),
        },
        Code::ResourceExhausted => "the controller is limiting requests: wait a moment and try again".to_owned(),
        Code::DeadlineExceeded => {
            "the controller did not answer in time: try again, and check its log if it persists".to_owned()
        }
        Code::Internal | Code::DataLoss | Code::Unknown => {
            "the controller failed on its side; its log has the details".to_owned()
        }
        // E.g. the enrollment port, which serves nothing but enrollment.
        Code::Unimplemented => "this server does not serve it: is --controller the controller's mTLS port, and \
                                is the controller as new as flotctl?"
            .to_owned(),
        Code::Ok | Code::Cancelled => return None,
    })
}

/// The `flotctl ... ls` that lists the things `what` acts on, if one does.
fn lister(what: &str) -> Option<&'static str> {
    let has = |word: &str| what.split_whitespace().any(|w| w == word);
    if has("silence") || has("silences") {
        Some("flotctl alerts silences")
    } else if has("alert") || has("alerts") {
        Some("flotctl alerts ls")
    } else if has("rollout") || has("deployment") || has("deployments") || has("history") {
        Some("flotctl deploy ls")
    } else if has("token") || has("tokens") {
        Some("flotctl token ls")
    } else if has("node") || has("nodes") || has("into") {
        Some("flotctl nodes ls")
    } else {
        None
    }
}

/// Unwraps a response, naming the call on failure.
pub fn call<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner).map_err(|s| status_error(what, &s))
}

/// The longest flotctl waits, in all, on the controller's pushback for one call.
const MAX_PUSHBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the controller asked the caller to wait before trying again: its
/// rate limit and load shedding refuse a call *before* running it and say so in
/// `grpc-retry-pushback-ms`, so such a call is safe to send again.
fn pushback(status: &tonic::Status) -> Option<std::time::Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status.metadata().get("grpc-retry-pushback-ms")?.to_str().ok()?.trim().parse().ok()?;
    Some(std::time::Duration::from_millis(ms.clamp(1, 10_000)))
}

/// Makes the call `attempt` makes, again after the controller's pushback while
/// it refuses it unrun (rate limit, load shedding), for up to a minute in all:
/// a fan-out over many nodes slows to the controller's pace instead of failing.
pub async fn with_pushback<T, F, Fut>(mut attempt: F) -> Result<tonic::Response<T>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut waited = std::time::Duration::ZERO;
    loop {
        let refused = match attempt().await {
            Err(status) => status,
            answer => return answer,
        };
        match pushback(&refused) {
            Some(wait) if waited + wait <= MAX_PUSHBACK_WAIT => {
                tracing::debug!(wait_ms = wait.as_millis() as u64, "controller pushed back; trying again");
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            _ => return Err(refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tonic::{Code, Status};

    use super::*;

    fn said(what: &str, status: Status) -> String {
        status_error(what, &status).to_string()
    }

    fn pushed_back(ms: &str) -> Status {
        let mut s = Status::resource_exhausted("rate limit: retry in 5 ms");
        s.metadata_mut().insert("grpc-retry-pushback-ms", ms.parse().unwrap());
        s
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_refused_unrun_is_made_again_after_the_pushback() {
        let mut calls = 0;
        let answer = with_pushback(|| {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(pushed_back("5")) } else { Ok(tonic::Response::new(n)) } }
        })
        .await;
        assert_eq!(answer.unwrap().into_inner(), 3);

        // Other refusals, and a pushback without its trailer, are the caller's to handle.
        let mut calls = 0;
        let answer: Result<tonic::Response<()>, Status> = with_pushback(|| {
            calls += 1;
            async { Err(Status::resource_exhausted("quota")) }
        })
        .await;
        assert_eq!((answer.unwrap_err().code(), calls), (Code::ResourceExhausted, 1));
        assert_eq!(pushback(&Status::unavailable("x")), None);
        assert_eq!(pushback(&pushed_back("nope")), None);

        // It gives up after a minute of waiting in all.
        let mut calls = 0u32;
        let answer: Result<tonic::Response<()>, Status> = with_pushback(|| {
            calls += 1;
            async { Err(pushed_back("10000")) }
        })
        .await;
        assert!(answer.is_err());
        assert_eq!(calls, 7, "six waits of 10 s, then the refusal");
    }

    #[test]
    fn a_refused_connection_says_to_start_the_controller_or_fix_the_address() {
        let text = connect_error(
            "https://10.0.0.1:7443",
            "transport error: tcp connect error: Connection refused (os error 111)",
        )
        .to_string();
        assert!(text.starts_with("cannot reach the controller at https://10.0.0.1:7443: transport error"), "{text}");
        assert!(text.contains("is the controller running?") && text.contains("flotctl context ls"), "{text}");
    }

    #[test]
    fn each_connect_failure_gets_its_own_advice() {
        for (detail, want) in [
            ("dns error: failed to lookup address information: Name or service not known", "does not resolve"),
            ("transport error: timed out", "firewall"),
            ("connect: Network is unreachable (os error 101)", "no route"),
            ("invalid peer certificate: UnknownIssuer", "not from the CA in --cacert"),
            (r#"invalid peer certificate: certificate not valid for name "ctl.example""#, "does not name this host"),
            ("invalid peer certificate: certificate expired: verification time 5", "clock"),
            ("received corrupt message of type InvalidContentType", "does not speak TLS"),
            ("received fatal alert: BadCertificate", "this fleet's CA"),
            ("something new", "is it running"),
        ] {
            let hint = connect_hint(detail);
            assert!(hint.contains(want), "{detail}: {hint}");
        }
    }

    #[test]
    fn unreadable_tls_files_name_the_file_and_the_flags() {
        let error = ClientError::Tls(TlsError::Io {
            path: PathBuf::from("/nowhere/ca.pem"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        let text = endpoint_error(error).to_string();
        assert!(text.contains("/nowhere/ca.pem") && text.contains("--cacert"), "{text}");
        let bad = ClientError::BadUrl { url: "http://x".into(), reason: "use https://HOST:PORT".into() };
        assert!(endpoint_error(bad).to_string().contains("pass --controller https://HOST:PORT"));
    }

    #[test]
    fn a_role_refusal_keeps_the_controllers_advice_and_adds_none() {
        let text = said(
            "revoke node gpu-a",
            Status::permission_denied(
                "operator bob has role viewer; RevokeNode needs role admin or higher: ask an admin for such a \
                 certificate",
            ),
        );
        assert_eq!(
            text,
            "revoke node gpu-a: operator bob has role viewer; RevokeNode needs role admin or higher: ask an admin for \
             such a certificate"
        );
        let node = said(
            "list nodes",
            Status::permission_denied("the Fleet API is for operators; this certificate identifies node gpu-a"),
        );
        assert!(node.contains("flotctl cert issue --user"), "{node}");
    }

    #[test]
    fn not_found_points_at_the_list_of_what_exists() {
        assert!(said("acknowledge alert", Status::not_found("no alert with id x")).contains("`flotctl alerts ls`"));
        assert!(said("expire silence", Status::not_found("no silence s")).contains("`flotctl alerts silences`"));
        assert!(said("get rollout of llama", Status::not_found("no deployment llama")).contains("`flotctl deploy ls`"));
        let own = said("get node x", Status::not_found("no node x; `flotctl nodes ls` lists the known nodes"));
        assert_eq!(own.matches("flotctl nodes ls").count(), 1, "the controller's hint is not repeated: {own}");
    }

    #[test]
    fn every_failure_says_what_to_do() {
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unavailable,
            Code::Unimplemented,
            Code::AlreadyExists,
            Code::Unauthenticated,
        ] {
            let text = said("apply deployment", Status::new(code, "it broke"));
            assert!(text.starts_with("apply deployment: it broke ("), "{code:?}: {text}");
            assert!(text.ends_with(')'), "{code:?}: {text}");
        }
        let down = said("list nodes", Status::unavailable("connection refused"));
        assert!(down.contains("flotctl context ls"), "{down}");
        let closed = said("list nodes", Status::unknown("transport error"));
        assert!(closed.contains("fleet's CA"), "{closed}");
        assert!(said("x", Status::unimplemented("")).contains("does not serve"));
    }
}
