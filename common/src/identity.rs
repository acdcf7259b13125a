//! Who is on the other end of a TLS connection, read from its certificate.
//!
//! Identities are URI subject alternative names that only the fleet CA writes:
//! `urn:flotilla:node:<node-id>` for agents, `urn:flotilla:operator:<role>:<name>`
//! for people and tools, `urn:flotilla:controller` for the controller. A certificate
//! carries exactly one of them, so an agent certificate can never act as an
//! operator or as the controller, and the other way round.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ids::{NodeId, NodeIdError};

const NODE_PREFIX: &str = "urn:flotilla:node:";
const OPERATOR_PREFIX: &str = "urn:flotilla:operator:";
const CONTROLLER_URI: &str = "urn:flotilla:controller";

/// An operator's role; what each may call is decided per method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads fleet state.
    Viewer,
    /// Also acts on nodes and deployments.
    Operator,
    /// Also manages identities, rules and security settings.
    Admin,
}

impl Role {
    /// The lowercase name used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(IdentityError::UnknownRole(other.to_owned())),
        }
    }
}

/// The identity a certificate proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent on the named node.
    Node(NodeId),
    /// A person or tool with a role.
    Operator { name: String, role: Role },
    /// The controller itself.
    Controller,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Operator { name, role } => write!(f, "operator {name} ({role})"),
            Identity::Controller => f.write_str("controller"),
        }
    }
}

/// Why a certificate does not name a usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509")]
    NotX509,
    #[error("certificate carries no Flotilla identity (urn:flotilla:… subject alternative name)")]
    Missing,
    #[error("certificate carries {0} Flotilla identities; exactly one is allowed")]
    Ambiguous(usize),
    #[error("certificate identity {uri:?}: {source}")]
    BadNodeId {
        uri: String,
        #[source]
        source: NodeIdError,
    },
    #[error("unknown role {0:?}: use viewer, operator or admin")]
    UnknownRole(String),
    #[error("malformed identity {0:?}")]
    Malformed(String),
}

impl Identity {
    /// The URI subject alternative name that encodes this identity.
    pub fn to_uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{NODE_PREFIX}{id}"),
            Identity::Operator { name, role } => format!("{OPERATOR_PREFIX}{role}:{name}"),
            Identity::Controller => CONTROLLER_URI.to_owned(),
        }
    }

    /// Parses one identity URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        if uri == CONTROLLER_URI {
            return Ok(Identity::Controller);
        }
        if let Some(id) = uri.strip_prefix(NODE_PREFIX) {
            return NodeId::new(id)
                .map(Identity::Node)
                .map_err(|source| IdentityError::BadNodeId { uri: uri.to_owned(), source });
        }
        if let Some(rest) = uri.strip_prefix(OPERATOR_PREFIX) {
            let (role, name) = rest.split_once(':').ok_or_else(|| IdentityError::Malformed(uri.to_owned()))?;
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(IdentityError::Malformed(uri.to_owned()));
            }
            return Ok(Identity::Operator { name: name.to_owned(), role: role.parse()? });
        }
        Err(IdentityError::Malformed(uri.to_owned()))
    }

    /// Reads the identity from a DER certificate. The caller has already verified
    /// the certificate chain (rustls does so during the handshake).
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::NotX509)?;
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::NotX509)?
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) if uri.starts_with("urn:flotilla:") => Some(*uri),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [] => Err(IdentityError::Missing),
            [one] => Self::from_uri(one),
            many => Err(IdentityError::Ambiguous(many.len())),
        }
    }

    /// The node id, when this is a node identity.
    pub fn node_id(&self) -> Option<&NodeId> {
        match self {
            Identity::Node(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        let ids = [
            Identity::Node(NodeId::new("gpu-1").unwrap()),
            Identity::Operator { name: "alice".into(), role: Role::Admin },
            Identity::Controller,
        ];
        for id in ids {
            assert_eq!(Identity::from_uri(&id.to_uri()).unwrap(), id);
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        assert!(Identity::from_uri("urn:flotilla:node:../x").is_err());
        assert!(Identity::from_uri("urn:flotilla:operator:root:bob").is_err());
        assert!(Identity::from_uri("urn:flotilla:operator:admin").is_err());
        assert!(Identity::from_uri("urn:other").is_err());
    }
}
