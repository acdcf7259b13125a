//! `flotctl demo`: a local fleet in one process — a controller and N agents with
//! simulated GPUs, over real mTLS on loopback, with a dev CA in the data dir.
//! This module is the only place flotctl links the daemon libraries.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use flotilla_common::pki::{self, CaInit};
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, NodeId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::DemoArgs;

/// The default alert rules (deploy/rules/default.yml), used when `--rules` is not given.
const DEFAULT_RULES: &str = include_str!("../../deploy/rules/default.yml");
use crate::context::{Context, CtlConfig};

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(args: DemoArgs, ctl_config: &Path) -> anyhow::Result<()> {
    // A temporary data dir lives as long as the demo and is removed at exit.
    let (dir, _temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t =
                tempfile::Builder::new().prefix("flotilla-demo-").tempdir().context("create a temporary data dir")?;
            (t.path().to_owned(), Some(t))
        }
    };
    let pki_dir = dir.join("pki");
    let nodes: Vec<NodeId> =
        (1..=args.agents).map(|i| NodeId::new(format!("demo-{i:02}"))).collect::<Result<_, _>>()?;
    prepare_pki(&pki_dir, &nodes)?;

    if let Some(rules) = &args.rules {
        flotilla_controller::alert::rules::RuleSet::load(rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut alerting = flotilla_controller::alert::engine::AlertingConfig {
        rules: args.rules.clone(),
        // The demo's agents start with it: there is nothing to wait for.
        restart_grace: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    if alerting.rules.is_none() {
        let path = dir.join("rules.yml");
        std::fs::write(&path, DEFAULT_RULES).with_context(|| format!("write {}", path.display()))?;
        alerting.rules = Some(path);
    }
    let controller_config = flotilla_controller::Config {
        listen: args.listen,
        alerting,
        data_dir: dir.join("controller"),
        tls: TlsFiles::from_pki_dir(&pki_dir, &pki::leaf_paths(&pki_dir, &Identity::Controller)).into(),
        metrics_listen: args.metrics_listen,
        ..Default::default()
    };
    let controller = flotilla_controller::Controller::bind(controller_config).await.with_context(|| {
        format!("start the demo controller on {} (is another demo running? pass --listen 127.0.0.1:0)", args.listen)
    })?;
    let addr = controller.local_addr();
    let metrics_addr = controller.metrics_addr();
    let url = format!("https://127.0.0.1:{}", addr.port());

    let admin =
        pki::leaf_paths(&pki_dir, &Identity::Operator { name: "admin".into(), role: flotilla_common::Role::Admin });
    write_context(ctl_config, &url, &pki_dir, &admin)?;

    let shutdown = flotilla_common::shutdown::on_signal();
    let tracker = TaskTracker::new();
    let controller_stop = CancellationToken::new();
    {
        let stop = controller_stop.clone();
        tracker.spawn(async move {
            if let Err(error) = controller.serve(stop).await {
                tracing::error!(%error, "demo controller failed");
            }
        });
    }
    let agents_stop = shutdown.child_token();
    for node in &nodes {
        let config = agent_config(&args, &dir, &pki_dir, node, &url);
        let stop = agents_stop.clone();
        let node = node.clone();
        tracker.spawn(async move {
            if let Err(error) = flotilla_agent::run(config, stop).await {
                tracing::error!(node_id = %node, %error, "demo agent failed");
            }
        });
    }
    tracker.close();

    println!(
        "Flotilla demo running: controller at {url}, {} agents × {} simulated GPUs.",
        args.agents, args.gpus_per_agent
    );
    println!("Data dir: {}{}", dir.display(), if args.data_dir.is_none() { " (removed at exit)" } else { "" });
    println!("The flotctl context 'demo' is now current ({}). Try, in another terminal:", ctl_config.display());
    println!("  flotctl nodes ls");
    println!("  flotctl nodes show demo-01");
    println!("  flotctl nodes ls -o json");
    println!("  flotctl sim inject demo-01 overheat --gpu 0");
    println!("  flotctl alerts ls");
    println!("  flotctl rules ls");
    if let Some(m) = metrics_addr {
        println!(
            "Fleet metrics (mTLS, scrape with the admin certificate): https://127.0.0.1:{}/metrics, e.g.\n  curl --cacert {ca} --cert {cert} --key {key} https://127.0.0.1:{}/metrics",
            m.port(),
            m.port(),
            ca = pki::ca_cert_path(&pki_dir).display(),
            cert = admin.cert.display(),
            key = admin.key.display(),
        );
    }
    println!("Press Ctrl-C to stop.");

    shutdown.cancelled().await;
    // Agents first, so that their last batches are acknowledged; then the controller.
    agents_stop.cancel();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    controller_stop.cancel();
    tracker.wait().await;
    println!("Demo stopped.");
    Ok(())
}

fn prepare_pki(pki_dir: &Path, nodes: &[NodeId]) -> anyhow::Result<()> {
    if !pki::ca_cert_path(pki_dir).exists() {
        pki::init_ca(pki_dir, &CaInit::default()).context("create the demo CA")?;
    }
    for node in nodes {
        let id = Identity::Node(node.clone());
        if !pki::leaf_paths(pki_dir, &id).cert.exists() {
            pki::issue(pki_dir, &id, pki::LEAF_VALIDITY, false)
                .with_context(|| format!("issue a certificate for {node}"))?;
        }
    }
    Ok(())
}

fn agent_config(args: &DemoArgs, dir: &Path, pki_dir: &Path, node: &NodeId, url: &str) -> flotilla_agent::Config {
    let mut c = flotilla_agent::Config {
        controller: url.to_owned(),
        node_id: Some(node.clone()),
        tls: TlsFiles::from_pki_dir(pki_dir, &pki::leaf_paths(pki_dir, &Identity::Node(node.clone()))),
        data_dir: dir.join("agents").join(node.as_str()),
        interval: args.interval,
        ..Default::default()
    };
    c.gpu.source = flotilla_agent::config::GpuSourceChoice::Simulated;
    c.gpu.simulated_count = args.gpus_per_agent;
    c.labels.insert("fleet".into(), "demo".into());
    c
}

fn write_context(path: &Path, url: &str, pki_dir: &Path, admin: &pki::CertPaths) -> anyhow::Result<()> {
    let abs = |p: &Path| -> anyhow::Result<PathBuf> {
        Ok(if p.is_absolute() { p.to_owned() } else { std::env::current_dir()?.join(p) })
    };
    let mut config = CtlConfig::load(path)?;
    config.contexts.insert(
        "demo".into(),
        Context {
            controller: url.to_owned(),
            ca: abs(&pki::ca_cert_path(pki_dir))?,
            cert: abs(&admin.cert)?,
            key: abs(&admin.key)?,
        },
    );
    config.current = Some("demo".into());
    config.save(path).with_context(|| format!("write the demo context to {}", path.display()))
}
