//! Renders `deploy/nginx/upstream.conf.tmpl` (compiled in) for one upstream.
//! The template has `{{name}}` placeholders; an unknown one is an error, so a
//! template edit that the agent does not understand fails a test, not a reload.

use flotilla_common::command::GatewayWeights;

use super::ConfirmTarget;

/// The upstream file template shipped in `deploy/nginx/`.
pub const TEMPLATE: &str = include_str!("../../../deploy/nginx/upstream.conf.tmpl");

/// A template that names something the renderer does not know, or is unclosed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("template placeholder {0:?} is unknown")]
    Unknown(String),
    #[error("template has an unclosed {{{{")]
    Unclosed,
}

/// The nginx `server` lines for the weights, one per line, indented.
fn server_lines(weights: &GatewayWeights) -> String {
    weights
        .servers
        .iter()
        .map(|s| {
            if s.weight == 0 {
                // nginx has no weight 0; `down` keeps the server out of rotation.
                format!("    server {} down;", s.address)
            } else {
                format!("    server {} weight={};", s.address, s.weight)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fills `template` for `weights`; `weights` must have passed `validate`.
pub fn render(template: &str, weights: &GatewayWeights, admin: &ConfirmTarget) -> Result<String, RenderError> {
    let mut out = String::with_capacity(template.len() + 64 * weights.servers.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(RenderError::Unclosed)?;
        let name = after[..end].trim();
        match name {
            "upstream" => out.push_str(&weights.upstream),
            "servers" => out.push_str(&server_lines(weights)),
            "revision" => out.push_str(&weights.revision()),
            "admin_listen" => out.push_str(&admin.addr.to_string()),
            "admin_host" => out.push_str(&admin.host(&weights.upstream)),
            "confirm_path" => out.push_str(&admin.path(&weights.upstream)),
            other => return Err(RenderError::Unknown(other.to_owned())),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> ConfirmTarget {
        ConfirmTarget::parse("http://127.0.0.1:8099/flotilla-gateway").unwrap()
    }

    #[test]
    fn the_shipped_template_renders_an_upstream_and_its_admin_server() {
        let w = GatewayWeights::parse("llama", "127.0.0.1:8001=90,127.0.0.1:8002=10,[::1]:8003=0").unwrap();
        let text = render(TEMPLATE, &w, &admin()).unwrap();
        assert!(!text.contains("{{"), "{text}");
        let want = "upstream llama {\n    server 127.0.0.1:8001 weight=90;\n    server 127.0.0.1:8002 weight=10;\n    server [::1]:8003 down;\n}";
        assert!(text.contains(want), "{text}");
        assert!(text.contains("listen 127.0.0.1:8099;"), "{text}");
        assert!(text.contains("server_name flotilla-gateway-llama;"), "{text}");
        assert!(text.contains("location = /flotilla-gateway/llama {"), "{text}");
        assert!(text.contains(&format!("return 200 \"{}\";", w.revision())), "{text}");
    }

    #[test]
    fn unknown_or_unclosed_placeholders_are_errors() {
        let w = GatewayWeights::parse("llama", "127.0.0.1:8001=1").unwrap();
        assert_eq!(render("a {{nope}}", &w, &admin()), Err(RenderError::Unknown("nope".into())));
        assert_eq!(render("a {{upstream", &w, &admin()), Err(RenderError::Unclosed));
        assert_eq!(render("{{ upstream }}!", &w, &admin()).unwrap(), "llama!");
    }
}
