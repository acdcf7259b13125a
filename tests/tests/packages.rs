//! The Debian packages of the agent and the controller: `cargo deb` over the
//! `[package.metadata.deb]` of their Cargo.toml and the files in
//! `deploy/debian/`; their contents; `systemd-analyze verify` and `security` on
//! their units; and a real install in a container that runs systemd as PID 1 on
//! this machine's Docker engine: users, directories and permissions, both
//! services started under their hardened units with the agent connected, an
//! upgrade that keeps edited config and restarts what ran, a remove that keeps
//! config and data, and a purge that leaves nothing.
//!
//! The packages hold the debug binaries the test command has already built
//! (`cargo build --workspace --bins`), not a release build: that would cost
//! many minutes on CI's two cores, and the packaging, units and scripts under
//! test are the same for either profile. cargo-deb packages only
//! `target/release/…` (it refuses the dev profile), so each test hands it a
//! scratch target directory whose `release/` holds hard links to the debug
//! binaries; `--strip` brings them near release size.
//!
//! The base image is made here, since no registry is reachable: `debootstrap
//! --variant=minbase` of the host's Debian release plus systemd and adduser,
//! `docker import`ed as `flotilla-pkgtest-base:CODENAME` and reused while its
//! recipe label matches. Containers are named `flotilla-pkgtest-…` and removed
//! by a drop guard. A missing tool skips the tests, except under CI (`CI` set),
//! where `./x test` installs them and a skip would hide a failure.

// Test helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use flotilla_tests::{ContainerCleanup, Pki, bin, eventually_within, nodes, state_of};

const AGENT: &str = "flotilla-agent";
const CONTROLLER: &str = "flotilla-controller";
/// The agent's node id in the container: the identity in its certificate.
const NODE: &str = "pkgtest-01";
/// How long a boot, a start or a reconnection in the container may take: a hang
/// guard, not a speed claim.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The base image's repository; its tag is the Debian codename.
const BASE_IMAGE: &str = "flotilla-pkgtest-base";
/// What the base image holds beyond `minbase`. The image carries this recipe as
/// a label and is rebuilt when it changes.
const BASE_RECIPE: &str = "minbase+systemd,systemd-sysv,adduser";
const RECIPE_LABEL: &str = "flotilla.pkgtest.recipe";
/// The Debian mirror debootstrap reads (the host's apt uses the same).
const MIRROR: &str = "http://deb.debian.org/debian";

#[test]
fn packages_hold_the_binaries_units_conffiles_and_maintainer_scripts() {
    if !packaging_tools() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let debs = build_debs(scratch.path(), "1");
    let arch = text(&run_ok(Command::new("dpkg").arg("--print-architecture")));
    let root = scratch.path().join("root");
    let controls = scratch.path().join("control");
    fs::create_dir_all(&controls).unwrap();
    let conffiles: [(&str, &Path, &[&str]); 2] = [
        (AGENT, &debs.agent, &["/etc/flotilla/agent.toml"]),
        (CONTROLLER, &debs.controller, &["/etc/flotilla/controller.toml", "/etc/flotilla/rules/default.yml"]),
    ];
    for (package, deb, conffiles) in conffiles {
        let fields = control_fields(deb);
        assert_eq!(fields["Package"], package);
        assert_eq!(fields["Version"], format!("{}-1", env!("CARGO_PKG_VERSION")));
        assert_eq!(fields["Architecture"], arch.trim());
        assert_eq!(fields["Section"], "admin");
        let depends = &fields["Depends"];
        assert!(depends.contains("adduser") && depends.contains("libc6"), "{package}: Depends: {depends}");

        let entries = listing(deb);
        let unit = format!("/usr/lib/systemd/system/{package}.service");
        let binary = format!("/usr/bin/{package}");
        for (path, mode) in [(binary.as_str(), "-rwxr-xr-x"), (unit.as_str(), "-rw-r--r--")] {
            assert_eq!(entries.get(path).map(String::as_str), Some(mode), "{package}: {path} in {entries:?}");
        }
        for conffile in conffiles {
            let want = if conffile.ends_with(".toml") { "-rw-r-----" } else { "-rw-r--r--" };
            assert_eq!(entries.get(*conffile).map(String::as_str), Some(want), "{package}: {conffile}");
        }
        assert!(entries.keys().all(|p| !p.starts_with("/var/")), "directories under /var are made by postinst");

        let control = controls.join(package);
        run_ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
        let listed = fs::read_to_string(control.join("conffiles")).unwrap();
        assert_eq!(listed.lines().collect::<Vec<_>>(), conffiles, "{package}: conffiles");
        for script in ["postinst", "prerm", "postrm"] {
            let path = control.join(script);
            let mode = fs::metadata(&path).unwrap_or_else(|e| panic!("{package} {script}: {e}")).permissions();
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o755, "{package} {script}");
            run_ok(Command::new("sh").arg("-n").arg(&path));
        }
        let script = |name: &str| fs::read_to_string(control.join(name)).unwrap();
        let (postinst, prerm, postrm) = (script("postinst"), script("prerm"), script("postrm"));
        let service = format!("{package}.service");
        assert!(postinst.contains("adduser --system"), "{package}: postinst makes the user");
        assert!(postinst.contains(&format!("deb-systemd-helper enable {service}")), "{package}: enabled");
        assert!(postinst.contains(&format!("try-restart {service}")), "{package}: restarted after upgrade");
        assert!(!postinst.contains("deb-systemd-invoke start"), "{package}: not started before it has a certificate");
        assert!(prerm.contains(&format!("deb-systemd-invoke stop {service}")), "{package}: stopped on remove");
        assert!(postrm.contains("\"purge\"") && postrm.contains("rm -rf /var/lib/flotilla/"), "{package}: purge");

        run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
        let shipped = fs::read_to_string(root.join(&unit[1..])).unwrap();
        let source = fs::read_to_string(workspace().join("deploy/debian").join(&service)).unwrap();
        assert_eq!(shipped, source, "{package}: the unit is deploy/debian/{service}");
        let version = run_ok(Command::new(root.join(&binary[1..])).arg("--version"));
        assert!(text(&version).contains(env!("CARGO_PKG_VERSION")), "{package} --version: {}", text(&version));
    }
    let rules = fs::read(root.join("etc/flotilla/rules/default.yml")).unwrap();
    assert_eq!(rules, fs::read(workspace().join("deploy/rules/default.yml")).unwrap());

    // The conffiles load as the daemons load them, and the units agree with them.
    let agent_toml = root.join("etc/flotilla/agent.toml");
    let agent = flotilla_agent::config::Config::load(Some(&agent_toml), Default::default())
        .unwrap_or_else(|e| panic!("the packaged agent.toml: {e}"));
    let unit = unit_settings(&root, AGENT);
    assert_eq!(unit["ExecStart"], ["/usr/bin/flotilla-agent --config /etc/flotilla/agent.toml"]);
    assert_eq!(unit["ReadWritePaths"], [agent.data_dir.display().to_string()]);
    assert_eq!(Path::new("/var/lib").join(&unit["StateDirectory"][0]), agent.data_dir);
    for file in [&agent.tls.ca, &agent.tls.cert, &agent.tls.key] {
        assert!(
            file.starts_with(&agent.data_dir),
            "renewal and enrollment write {}: it must be writable",
            file.display()
        );
    }
    let controller_toml = root.join("etc/flotilla/controller.toml");
    let controller = flotilla_controller::config::Config::load(Some(&controller_toml), Default::default())
        .unwrap_or_else(|e| panic!("the packaged controller.toml: {e}"));
    let unit = unit_settings(&root, CONTROLLER);
    assert_eq!(unit["ExecStart"], ["/usr/bin/flotilla-controller --config /etc/flotilla/controller.toml"]);
    assert_eq!(unit["ReadWritePaths"], [controller.data_dir.display().to_string()]);
    assert_eq!(Path::new("/var/lib").join(&unit["StateDirectory"][0]), controller.data_dir);
    assert_eq!(controller.alerting.rules.as_deref(), Some(Path::new("/etc/flotilla/rules/default.yml")));
    assert!(controller.tls.key.starts_with("/etc/flotilla/pki"), "{}", controller.tls.key.display());
    for (package, unit) in [(AGENT, &unit_settings(&root, AGENT)), (CONTROLLER, &unit)] {
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(unit.get(key).map(Vec::as_slice), Some(&[want.to_owned()][..]), "{package}: {key}");
        }
        assert!(unit.contains_key("LimitNOFILE"), "{package}: LimitNOFILE");
    }
    assert!(!unit_settings(&root, AGENT).contains_key("PrivateDevices"), "NVML needs /dev/nvidia*");

    // systemd-analyze checks the units against the unpacked packages (so the
    // ExecStart binaries exist) plus the host's own units (the targets they
    // name). It exits 0 on unknown keys and bad values, so any output fails.
    let units_dir = root.join("usr/lib/systemd/system");
    for entry in fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        let dest = units_dir.join(entry.file_name());
        if entry.file_type().unwrap().is_file() && !dest.exists() {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
    for package in [AGENT, CONTROLLER] {
        let service = format!("{package}.service");
        let out = run_ok(
            Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).arg(&service),
        );
        let said = format!("{}{}", text(&out), String::from_utf8_lossy(&out.stderr));
        assert!(said.trim().is_empty(), "systemd-analyze verify {service}: {said}");
        // Exposure on systemd's 0-10 scale, times ten: both stay well inside "OK".
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(&service)
            .output()
            .unwrap();
        assert!(out.status.success(), "systemd-analyze security {service}:\n{}", text(&out));
    }
}

#[test]
fn packages_install_start_upgrade_and_purge_under_systemd_in_a_container() {
    if !packaging_tools() || !container_tools() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let first = build_debs(&scratch.path().join("r1"), "1");
    let second = build_debs(&scratch.path().join("r2"), "2");
    let pki = Pki::new(&scratch.path().join("pki"));
    let node = pki.node(NODE);
    // The scratch dir is mounted at /pkgs; these are its files as the container sees them.
    let inside =
        |path: &Path| Path::new("/pkgs").join(path.strip_prefix(scratch.path()).unwrap()).display().to_string();
    let image = base_image();

    let name = format!("flotilla-pkgtest-{:08x}", rand::random::<u32>());
    let _cleanup = ContainerCleanup::new([name.clone()]);
    run_ok(
        Command::new("docker")
            .args(["run", "-d", "--name", &name, "--hostname", "pkgtest", "--env", "container=docker"])
            // systemd as PID 1 sets up the units' sandboxes (mount namespaces,
            // seccomp filters, capability bounds): it needs CAP_SYS_ADMIN and no
            // seccomp profile of the engine's. Every capability but
            // CAP_SYS_RESOURCE, rather than --privileged: engines run in a
            // sandbox that lacks it (as this project's machines do) refuse
            // --privileged, and systemd here needs it for nothing.
            .args(["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE"])
            .args(["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"])
            .args([
                "--cgroupns=host",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:rw",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
            ])
            .arg("-v")
            .arg(format!("{}:/pkgs:ro", scratch.path().display()))
            // The controller's port on a loopback port the engine picks.
            .args(["-p", "127.0.0.1::7443", &image, "/sbin/init"]),
    );
    let c = Container { name };
    eventually_within(HANG_GUARD, "systemd to boot in the container", |last| {
        let state = text(&c.sh("systemctl is-system-running"));
        *last = state.trim().to_owned();
        matches!(state.trim(), "running" | "degraded").then_some(())
    });

    // Install: users, groups, directories, permissions; enabled, not started.
    c.ok("groupadd --system docker");
    c.ok(&format!("dpkg -i {} {}", inside(&first.controller), inside(&first.agent)));
    for (user, home) in [("flotilla", "/var/lib/flotilla/controller"), ("flotilla-agent", "/var/lib/flotilla/agent")] {
        let entry = c.ok(&format!("getent passwd {user}"));
        let fields: Vec<&str> = entry.trim().split(':').collect();
        assert_eq!((fields[5], fields[6]), (home, "/usr/sbin/nologin"), "{entry}");
        assert!(fields[2].parse::<u32>().unwrap() < 1000, "{user} is a system user: {entry}");
    }
    let groups = c.ok("id -nG flotilla-agent");
    assert!(groups.split_whitespace().any(|g| g == "docker"), "the agent reaches the engine's socket: {groups}");
    let want_modes = [
        ("/etc/flotilla/controller.toml", "root:flotilla 640"),
        ("/etc/flotilla/agent.toml", "root:flotilla-agent 640"),
        ("/etc/flotilla/rules/default.yml", "root:root 644"),
        ("/etc/flotilla/pki", "root:flotilla 750"),
        ("/var/lib/flotilla/controller", "flotilla:flotilla 750"),
        ("/var/lib/flotilla/agent", "flotilla-agent:flotilla-agent 750"),
        ("/var/lib/flotilla/agent/pki", "flotilla-agent:flotilla-agent 700"),
    ];
    assert_modes(&c, &want_modes);
    assert_eq!(
        c.ok("systemctl is-enabled flotilla-controller flotilla-agent").split_whitespace().collect::<Vec<_>>(),
        ["enabled", "enabled"]
    );
    let active = text(&c.sh("systemctl is-active flotilla-controller flotilla-agent"));
    assert_eq!(
        active.split_whitespace().collect::<Vec<_>>(),
        ["inactive", "inactive"],
        "not started without certificates"
    );

    // The README's steps: certificates in place, then start.
    let controller_cert = pki.controller();
    c.ok(&format!(
        "set -e
         install -m 0644 {ca} /etc/flotilla/pki/ca.pem
         install -m 0644 {cert} /etc/flotilla/pki/controller.pem
         install -m 0640 -g flotilla {key} /etc/flotilla/pki/controller.key
         install -m 0644 -o flotilla-agent -g flotilla-agent {ca} /var/lib/flotilla/agent/pki/ca.pem
         install -m 0644 -o flotilla-agent -g flotilla-agent {node_cert} /var/lib/flotilla/agent/pki/agent.pem
         install -m 0600 -o flotilla-agent -g flotilla-agent {node_key} /var/lib/flotilla/agent/pki/agent.key
         systemctl start flotilla-controller flotilla-agent",
        ca = inside(&pki.ca()),
        cert = inside(&controller_cert.cert),
        key = inside(&controller_cert.key),
        node_cert = inside(&node.cert),
        node_key = inside(&node.key),
    ));
    let url = format!("https://{}", published_port(&c.name, 7443));
    wait_connected(&c, &pki, &url);
    let before = running_as_hardened(&c);
    let key_sum = c.ok("sha256sum /var/lib/flotilla/controller/command-signing.key");
    assert_modes(&c, &[("/var/lib/flotilla/controller/command-signing.key", "flotilla:flotilla 600")]);

    // Upgrade: the operator's edits are kept without a prompt, the store too,
    // and the services that ran are restarted on the new version.
    c.ok("echo '# edited by the operator' >> /etc/flotilla/agent.toml");
    c.ok("echo '# edited by the operator' >> /etc/flotilla/controller.toml");
    c.ok(&format!("dpkg -i {} {}", inside(&second.controller), inside(&second.agent)));
    let versions = c.ok("dpkg-query -W -f '${Version}\\n' flotilla-agent flotilla-controller");
    let want = format!("{}-2", env!("CARGO_PKG_VERSION"));
    assert_eq!(versions.lines().collect::<Vec<_>>(), [want.as_str(), want.as_str()]);
    for file in ["agent.toml", "controller.toml"] {
        assert!(c.ok(&format!("cat /etc/flotilla/{file}")).ends_with("# edited by the operator\n"), "{file} kept");
    }
    assert_eq!(c.ok("find /etc/flotilla -name '*.dpkg-*'"), "", "no conffile prompt or copy");
    assert_modes(&c, &want_modes);
    assert_eq!(c.ok("sha256sum /var/lib/flotilla/controller/command-signing.key"), key_sum, "the store is kept");
    wait_connected(&c, &pki, &url);
    let after = running_as_hardened(&c);
    for (service, (old, new)) in before.iter().zip(&after).enumerate() {
        assert_ne!(old, new, "service {service} was restarted after the upgrade");
    }

    // Remove keeps config and data; purge removes both (the users stay).
    c.ok("dpkg -r flotilla-agent flotilla-controller");
    let active = text(&c.sh("systemctl is-active flotilla-controller flotilla-agent"));
    assert!(active.split_whitespace().all(|s| s == "inactive"), "stopped on remove: {active}");
    c.ok("test ! -e /usr/bin/flotilla-agent && test ! -e /usr/bin/flotilla-controller");
    c.ok("test -f /etc/flotilla/agent.toml && test -f /etc/flotilla/controller.toml");
    c.ok("test -f /var/lib/flotilla/controller/command-signing.key && test -d /var/lib/flotilla/agent/pki");
    c.ok("dpkg -P flotilla-agent flotilla-controller");
    c.ok("test ! -e /etc/flotilla && test ! -e /var/lib/flotilla");
    let left = c.ok("find /etc/systemd/system /usr/lib/systemd/system /usr/share/doc -name '*flotilla*'");
    assert_eq!(left, "", "no unit, enablement link, mask or doc is left after purge");
    c.ok("getent passwd flotilla flotilla-agent");
}

/// The cargo-deb, dpkg-deb and systemd-analyze the packaging tests need.
fn packaging_tools() -> bool {
    have("cargo-deb", Command::new(cargo()).args(["deb", "--version"]), "`cargo install cargo-deb --locked`")
        && have("dpkg-deb", Command::new("dpkg-deb").arg("--version"), "Debian's dpkg")
        && have("systemd-analyze", Command::new("systemd-analyze").arg("--version"), "Debian's systemd package")
}

/// The Docker engine and, unless the base image is already built, debootstrap.
fn container_tools() -> bool {
    have("docker", Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]), "a running Docker engine")
        && (base_image_current(&base_tag())
            || have("debootstrap", Command::new(debootstrap()).arg("--version"), "Debian's debootstrap package"))
}

/// Whether `probe` runs and succeeds. Without it the test is skipped, or fails
/// under CI, where `./x test` installs every tool.
#[allow(clippy::print_stderr)] // a skipped test says why, as the test bodies do
fn have(tool: &str, probe: &mut Command, hint: &str) -> bool {
    let ok = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{tool} is missing under CI: {hint}");
        eprintln!("skipping: {tool} is missing ({hint})");
    }
    ok
}

/// The two packages of one revision.
#[derive(Debug)]
struct Debs {
    agent: PathBuf,
    controller: PathBuf,
}

/// `cargo deb --no-build` of both daemons with Debian revision `revision`, into
/// `scratch/debs`, from the debug binaries (see the module comment).
fn build_debs(scratch: &Path, revision: &str) -> Debs {
    let target = scratch.join("target");
    let release = target.join("release");
    fs::create_dir_all(&release).unwrap();
    let out = scratch.join("debs");
    let deb = |package: &str| {
        let built = bin(package);
        let link = release.join(package);
        fs::hard_link(&built, &link).or_else(|_| fs::copy(&built, &link).map(drop)).unwrap();
        let made = run_ok(
            Command::new(cargo())
                .args(["deb", "-p", package, "--no-build", "--strip", "--fast", "--locked", "--deb-revision", revision])
                .arg("--output")
                .arg(&out)
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(workspace()),
        );
        let path = PathBuf::from(text(&made).lines().last().unwrap_or_default().trim());
        assert!(path.is_file(), "cargo deb -p {package} made no package: {}", text(&made));
        path
    };
    Debs { agent: deb(AGENT), controller: deb(CONTROLLER) }
}

/// The control fields of `deb` (`dpkg-deb -f`), continuation lines left out.
fn control_fields(deb: &Path) -> BTreeMap<String, String> {
    let out = run_ok(Command::new("dpkg-deb").arg("-f").arg(deb));
    text(&out)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| !k.starts_with(' '))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The files of `deb` (`dpkg-deb -c`) by absolute path, with their mode string;
/// every entry must be root's.
fn listing(deb: &Path) -> BTreeMap<String, String> {
    let out = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    text(&out)
        .lines()
        .map(|line| {
            // "-rw-r--r-- 0/0   1748 2026-01-01 00:00 ./etc/flotilla/agent.toml"
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cols[1], "0/0", "{line}");
            let path = cols.last().unwrap().trim_start_matches('.').trim_end_matches('/');
            (path.to_owned(), cols[0].to_owned())
        })
        .collect()
}

/// The `[Service]` settings of a packaged unit, each key with its values in order.
fn unit_settings(root: &Path, package: &str) -> BTreeMap<String, Vec<String>> {
    let unit = fs::read_to_string(root.join(format!("usr/lib/systemd/system/{package}.service"))).unwrap();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let service = unit.split("[Service]").nth(1).expect("a [Service] section").split("\n[").next().unwrap();
    for line in service.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{package}: {line}"));
        settings.entry(key.to_owned()).or_default().push(value.to_owned());
    }
    settings
}

/// A running container of the base image.
#[derive(Debug)]
struct Container {
    name: String,
}

impl Container {
    /// `sh -c script` in the container.
    fn sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("docker exec")
    }

    /// `sh -c script`, which must succeed; its stdout. A failure shows the
    /// services' journal too.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            let journal = self.sh("journalctl --no-pager -n 60 -u flotilla-controller -u flotilla-agent");
            panic!(
                "in the container: {script}\nfailed ({}): {}{}\njournal:\n{}",
                out.status,
                text(&out),
                String::from_utf8_lossy(&out.stderr),
                text(&journal)
            );
        }
        text(&out)
    }
}

/// Owner, group and octal mode of each path, as `stat` says them.
fn assert_modes(c: &Container, want: &[(&str, &str)]) {
    for (path, mode) in want {
        let got = c.ok(&format!("stat -c '%U:%G %a' {path}"));
        assert_eq!(got.trim(), *mode, "{path}");
    }
}

/// Waits until the controller in the container lists the agent as connected.
fn wait_connected(c: &Container, pki: &Pki, url: &str) {
    eventually_within(HANG_GUARD, "the packaged agent to connect to the packaged controller", |last| {
        match nodes(pki, url) {
            Ok(list) => match state_of(&list, NODE) {
                // Degraded is connected too: the container has no GPU driver and no engine socket.
                Some(state) if state == "up" || state == "degraded" => return Some(()),
                other => *last = format!("{NODE} is {other:?}"),
            },
            Err(e) => *last = format!("{e}; {}", text(&c.sh("systemctl is-active flotilla-controller flotilla-agent"))),
        }
        None
    });
}

/// The main PIDs of the controller and the agent, after checking that each
/// runs as its user with no capabilities, no new privileges and a read-only
/// root but for its data dir.
fn running_as_hardened(c: &Container) -> Vec<u32> {
    let mut pids = Vec::new();
    for (service, user, data_dir) in [
        ("flotilla-controller", "flotilla", "/var/lib/flotilla/controller"),
        ("flotilla-agent", "flotilla-agent", "/var/lib/flotilla/agent"),
    ] {
        let pid: u32 = c.ok(&format!("systemctl show -p MainPID --value {service}")).trim().parse().unwrap();
        assert_ne!(pid, 0, "{service} runs");
        assert_eq!(c.ok(&format!("stat -c %U /proc/{pid}")).trim(), user, "{service}");
        let status = c.ok(&format!("cat /proc/{pid}/status"));
        for line in ["NoNewPrivs:\t1", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000"] {
            assert!(status.lines().any(|l| l == line), "{service}: {line} in\n{status}");
        }
        // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS …
        let mounts = c.ok(&format!("cat /proc/{pid}/mountinfo"));
        let options = |point: &str| {
            mounts
                .lines()
                .rfind(|l| l.split_whitespace().nth(4) == Some(point))
                .and_then(|l| l.split_whitespace().nth(5))
                .map(str::to_owned)
        };
        assert!(options("/").is_some_and(|o| o.starts_with("ro")), "{service}: / is read-only:\n{mounts}");
        assert!(options(data_dir).is_some_and(|o| o.starts_with("rw")), "{service}: {data_dir} is writable");
        pids.push(pid);
    }
    pids
}

/// The host address the engine published the container's `port` on.
fn published_port(name: &str, port: u16) -> String {
    let out = run_ok(Command::new("docker").args(["port", name, &format!("{port}/tcp")]));
    text(&out)
        .lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("port {port} is published on loopback: {}", text(&out)))
        .trim()
        .to_owned()
}

/// `flotilla-pkgtest-base:CODENAME`, the host's Debian release.
fn base_tag() -> String {
    let release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .filter(|c| !c.is_empty())
        .expect("a Debian host: /etc/os-release names a VERSION_CODENAME");
    format!("{BASE_IMAGE}:{codename}")
}

/// Whether `tag` exists and was made by the current recipe.
fn base_image_current(tag: &str) -> bool {
    let format = format!("{{{{index .Config.Labels \"{RECIPE_LABEL}\"}}}}");
    Command::new("docker")
        .args(["image", "inspect", "--format", &format, tag])
        .output()
        .is_ok_and(|out| out.status.success() && text(&out).trim() == BASE_RECIPE)
}

/// The base image: built once per recipe (minutes: debootstrap downloads from
/// the Debian mirror), then reused.
fn base_image() -> String {
    let tag = base_tag();
    if base_image_current(&tag) {
        return tag;
    }
    // Test processes of parallel runs share the engine: one builds, the rest
    // wait on the lock and then find the image.
    let lock = fs::File::create(std::env::temp_dir().join("flotilla-pkgtest-image.lock")).unwrap();
    lock.lock().expect("take the image build lock");
    if base_image_current(&tag) {
        return tag;
    }
    let codename = tag.rsplit(':').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    let include = BASE_RECIPE.strip_prefix("minbase+").unwrap();
    run_ok(
        Command::new(debootstrap())
            .args(["--variant=minbase", &format!("--include={include}"), codename])
            .arg(&rootfs)
            .arg(MIRROR),
    );
    let tarball = dir.path().join("rootfs.tar");
    run_ok(Command::new("tar").arg("-C").arg(&rootfs).args(["--numeric-owner", "-cf"]).arg(&tarball).arg("."));
    run_ok(
        Command::new("docker")
            .arg("import")
            .args(["--change", &format!("LABEL {RECIPE_LABEL}={BASE_RECIPE}")])
            .args(["--change", r#"CMD ["/sbin/init"]"#])
            .arg(&tarball)
            .arg(&tag),
    );
    drop(lock);
    tag
}

/// debootstrap, which lives in /usr/sbin (not on every PATH).
fn debootstrap() -> PathBuf {
    let sbin = Path::new("/usr/sbin/debootstrap");
    if sbin.exists() { sbin.to_owned() } else { PathBuf::from("debootstrap") }
}

/// The cargo that runs the tests, for `cargo deb`.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_owned()
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", text(&out), String::from_utf8_lossy(&out.stderr));
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
