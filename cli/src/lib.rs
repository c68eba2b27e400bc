//! `tunnel-cli`: what the command lines of `tunnel-device`, `tunnel-client` and `tunnel-relay`
//! share. Shell completions and man pages are generated from each binary's own clap definition,
//! so they can never disagree with `--help`.
//!
//! Also the global logging options, [`LogArgs`].
//!
//! Kind: IO (writes to stdout or to files). Only the binaries depend on this crate; the
//! libraries never see clap.

#![warn(missing_docs, clippy::missing_errors_doc)]

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;
use tunnel_core::logging::{self, LogFormat};

/// `--log-level` and `--log-format`, global options of every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    /// [default: info; warn for tunnel-client stdio]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log lines on stderr as text, or as one JSON object per line (for log collectors).
    #[arg(
        long,
        global = true,
        default_value_t = LogFormat::Text,
        env = "TUNNEL_LOG_FORMAT",
        value_name = "text|json"
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the logger: the level given, else `default`, for the project's crates and
    /// `crate_name`; text lines are coloured when stderr is a terminal.
    pub fn init<W>(&self, default: &str, crate_name: &str, writer: W)
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        use std::io::IsTerminal;
        logging::init(
            self.log_level.as_deref().unwrap_or(default),
            &[crate_name],
            self.log_format,
            std::io::stderr().is_terminal(),
            writer,
        );
    }
}

/// The `completions` and `man` subcommands of every binary: flatten it into the binary's
/// command enum (`#[command(flatten)] Docs(tunnel_cli::DocsCommand)`) and hand it the binary's
/// `Cli::command()` in [`DocsCommand::run`].
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DocsCommand {
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell (e.g.
    /// `completions bash` into /etc/bash_completion.d/; the Debian package installs them).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (one for the binary and one per subcommand) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".", value_name = "DIR")]
        dir: PathBuf,
    },
}

impl DocsCommand {
    /// Runs it for `cmd`: the completion script to stdout, or the man pages into the directory
    /// and a line on stdout saying how many.
    ///
    /// # Errors
    /// What went wrong writing the man pages, for the user (the binary exits 1 with it).
    pub fn run(self, cmd: clap::Command) -> Result<(), String> {
        match self {
            Self::Completions { shell } => completions(cmd, shell, &mut std::io::stdout()),
            Self::Man { dir } => {
                let pages = man_pages(cmd, &dir)
                    .map_err(|e| format!("cannot write man pages to '{}': {e}", dir.display()))?;
                println!("Wrote {} man pages to {}", pages.len(), dir.display());
            }
        }
        Ok(())
    }
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes the man pages of `cmd` into `dir`: `NAME.1` and `NAME-SUBCOMMAND.1` for every
/// subcommand, recursively. Returns the files written.
///
/// # Errors
/// The IO error creating the directory or writing a page.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let name = cmd.get_name().to_string();
    clap_mangen::generate_to(cmd, dir)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "1")
                && p.file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s == name || s.starts_with(&format!("{name}-")))
        })
        .collect();
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> clap::Command {
        clap::Command::new("tunnel-test")
            .about("A test tool")
            .subcommand(
                clap::Command::new("run")
                    .about("Run it")
                    .arg(clap::Arg::new("listen").long("listen")),
            )
            .subcommand(clap::Command::new("fingerprint").about("Print the key"))
    }

    #[test]
    fn completions_name_every_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(cmd(), shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("fingerprint"), "{shell}: {text}");
            assert!(text.contains("listen"), "{shell}: {text}");
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = man_pages(cmd(), dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "tunnel-test-fingerprint.1",
                "tunnel-test-run.1",
                "tunnel-test.1"
            ]
        );
        let run = std::fs::read_to_string(dir.path().join("tunnel-test-run.1")).unwrap();
        assert!(run.contains(".TH tunnel-test-run 1"), "{run}");
        assert!(run.contains("listen"), "{run}");
    }
}
