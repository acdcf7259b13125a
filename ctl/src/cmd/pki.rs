//! `flotctl ca init` and `flotctl cert issue`: local files, no controller needed.

use flotilla_common::pki::{self, CaInit};
use flotilla_common::{Identity, NodeId, Role};

use crate::UsageError;
use crate::cli::{CaCmd, CertCmd};

pub fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    let CaCmd::Init { dir, sans, admin, force } = cmd;
    let files = pki::init_ca(&dir, &CaInit { controller_sans: sans.clone(), admin_name: admin.clone(), force })
        .map_err(usage_if_exists)?;
    println!("Fleet CA created in {}", dir.display());
    println!("  CA certificate:      {}", files.ca_cert.display());
    println!(
        "  controller cert/key: {} {}  (names: {})",
        files.controller.cert.display(),
        files.controller.key.display(),
        sans.join(", ")
    );
    println!(
        "  admin cert/key:      {} {}  (operator {admin}, role admin)",
        files.admin.cert.display(),
        files.admin.key.display()
    );
    println!(
        "Keep {}/ca.key offline; issue agent certificates with `flotctl cert issue --node ID --dir {}`.",
        dir.display(),
        dir.display()
    );
    Ok(())
}

pub fn cert(cmd: CertCmd) -> anyhow::Result<()> {
    let CertCmd::Issue { node, user, role, dir, validity, force } = cmd;
    let identity = match (node, user) {
        (Some(node), _) => {
            Identity::Node(NodeId::new(node.clone()).map_err(|e| UsageError(format!("--node {node:?}: {e}")))?)
        }
        (None, Some(name)) => {
            let role: Role = role.parse().map_err(|e| UsageError(format!("--role: {e}")))?;
            let valid =
                !name.is_empty() && name.len() <= 128 && !name.contains(':') && !name.chars().any(char::is_control);
            if !valid {
                return Err(UsageError(format!("--user {name:?}: use 1-128 printable characters without ':'")).into());
            }
            Identity::Operator { name, role }
        }
        (None, None) => return Err(UsageError("pass --node ID or --user NAME".to_owned()).into()),
    };
    let paths = pki::issue(&dir, &identity, validity, force).map_err(usage_if_exists)?;
    println!("Issued a certificate for {identity}, valid {}", humantime::format_duration(validity));
    println!("  certificate: {}", paths.cert.display());
    println!("  key:         {}", paths.key.display());
    println!("  CA:          {}", pki::ca_cert_path(&dir).display());
    Ok(())
}

fn usage_if_exists(e: pki::PkiError) -> anyhow::Error {
    match e {
        pki::PkiError::Exists { .. } => UsageError(e.to_string()).into(),
        other => other.into(),
    }
}
