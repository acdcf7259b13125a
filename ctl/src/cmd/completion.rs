//! `flotctl completion SHELL|--dir DIR` and `flotctl man --dir DIR`: shell completion
//! scripts and man pages generated from the clap grammar, so they never drift from it.
//! Packagers run the built binary (no build script, config or controller):
//! `flotctl completion --dir D/completions && flotctl man --dir D/man`. There is no
//! hidden command for this, because clap_complete offers hidden commands too.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::UsageError;
use crate::cli::{Cli, CompletionArgs, ManArgs};

/// The name the scripts complete and the pages are named after.
const BIN: &str = "flotctl";

/// The shells `completion --dir` writes scripts for.
const PACKAGED_SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `flotctl completion SHELL`: the script on stdout; `--dir DIR`: a file per shell.
pub fn completion(args: &CompletionArgs) -> anyhow::Result<()> {
    match (&args.dir, args.shell) {
        (Some(dir), _) => {
            let written = completion_files(dir)?;
            let list: String = written.iter().map(|p| format!("{}\n", p.display())).collect();
            crate::output::write_stdout(&list)
        }
        (None, Some(shell)) => {
            let script = String::from_utf8(script(shell)).context("the completion script is not UTF-8")?;
            crate::output::write_stdout(&script)
        }
        // clap requires one of the two; this only guards a grammar change.
        (None, None) => Err(UsageError("name a shell (bash, zsh, fish, ...) or pass --dir DIR".to_owned()).into()),
    }
}

/// `flotctl man --dir DIR`: one page per command.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let pages = man_pages(&args.dir)?;
    crate::output::write_stdout(&format!(
        "wrote {} man pages to {} (read one with `man -l {}`, or add the directory's parent to MANPATH)\n",
        pages.len(),
        args.dir.display(),
        args.dir.join(format!("{BIN}.1")).display()
    ))
}

/// Writes the script of every packaged shell into `dir` under its usual name.
fn completion_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    PACKAGED_SHELLS
        .into_iter()
        .map(|shell| {
            clap_complete::generate_to(shell, &mut Cli::command(), BIN, dir).with_context(|| {
                format!("write the {shell} completion script into {} (is it writable?)", dir.display())
            })
        })
        .collect()
}

/// The completion script for `shell`.
fn script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut script);
    script
}

/// Writes `flotctl.1` and `flotctl-GROUP[-COMMAND].1` for every visible command into
/// `dir` (created if missing); returns the paths written.
fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Built once, so that each subcommand carries its full name (`flotctl-nodes-ls`)
    // and the global flags; `help` is clap's, not a command with a page of its own.
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let mut written = Vec::new();
    write_pages(&root, dir, &mut written)
        .with_context(|| format!("write man pages into {} (is it writable?)", dir.display()))?;
    Ok(written)
}

/// Writes the page of `cmd`, then those of its visible subcommands.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone()).manual("Flotilla Manual").generate_to(dir)?;
    written.push(page);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in PACKAGED_SHELLS {
            let script = String::from_utf8(script(shell)).unwrap();
            for word in ["nodes", "alerts", "deploy", "completion", "man", "watch", "color"] {
                assert!(script.contains(word), "{shell}: {word} missing");
            }
        }
    }

    #[test]
    fn dir_writes_a_script_per_packaged_shell() {
        let dir = tempfile::tempdir().unwrap();
        let written = completion_files(&dir.path().join("completions")).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["flotctl.bash", "_flotctl", "flotctl.fish"]);
        assert!(written.iter().all(|p| std::fs::metadata(p).unwrap().len() > 0));
    }

    #[test]
    fn man_writes_a_page_per_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in ["flotctl.1", "flotctl-nodes.1", "flotctl-nodes-ls.1", "flotctl-completion.1", "flotctl-man.1"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let ls = std::fs::read_to_string(dir.path().join("flotctl-nodes-ls.1")).unwrap();
        assert!(ls.starts_with(".ie") || ls.starts_with(".TH"), "roff: {}", &ls[..ls.len().min(80)]);
        assert!(ls.contains("\\-\\-watch") && ls.contains("\\-\\-controller"), "flags and global flags are listed");
    }
}
