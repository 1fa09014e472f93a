//! `fhirsync check -f FILE [--secrets-dir DIR]`: a preflight like `linkerd check`. The spec is valid
//! (as the API server and the operator would find it), then everything a run needs answers — each
//! line ✓ or ✗ with what to fix. Exit 0 only if every check passes (1 if one fails, 2 for a file
//! that cannot be checked at all).

use std::io::IsTerminal;

use super::input::{SpecArgs, load_checked};
use crate::api::RunTemplate;
use crate::run::Options;
use crate::run::preflight::{Finding, preflight};

/// Arguments of `check`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// Runs the checks; returns the exit code.
pub async fn run(args: Args) -> i32 {
    let color = std::io::stdout().is_terminal();
    let mark = |ok: bool| match (ok, color) {
        (true, true) => "\u{1b}[32m✓\u{1b}[0m",
        (false, true) => "\u{1b}[31m✗\u{1b}[0m",
        (true, false) => "✓",
        (false, false) => "✗",
    };
    let (sync, values) = match load_checked(&args.spec.file) {
        Ok(x) => x,
        Err(e) => {
            println!("{} spec is valid — {e}", mark(false));
            return 2;
        }
    };
    println!("{} spec is valid — {}", mark(true), args.spec.file.display());
    let ns = sync.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let secrets = args.spec.secrets();
    let findings =
        preflight(&RunTemplate::from(&sync.spec), &values.template, &ns, secrets.as_ref(), &Options::default()).await;
    for f in &findings {
        print_finding(f, mark(f.ok));
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if failed == 0 {
        println!("\nall checks passed: `fhirsync sync-once -f {}` is ready to run", args.spec.file.display());
        0
    } else {
        println!("\n{failed} check(s) failed");
        1
    }
}

fn print_finding(f: &Finding, mark: &str) {
    println!("{mark} {} — {}", f.check, f.detail);
    if let Some(fix) = &f.fix {
        println!("    fix: {fix}");
    }
}
