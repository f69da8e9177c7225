//! `qed cache`: what the cache on disk of remote images holds, and making room in it.

use crate::remote::HostCacheArgs;
use crate::units::human_size;
use crate::Output;
use anyhow::{Context, Result};
use qed::{clear_host_cache, host_cache_info, prune_host_cache, HostCacheOptions, PruneReport};
use serde_json::json;
use std::time::SystemTime;

/// Show or manage the cache on disk that every qed process of the host shares for
/// remote images.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Show where the cache is, what it holds, and which objects are in use.
    Info {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[command(flatten)]
        cache: HostCacheArgs,
    },
    /// Remove the least recently used chunks until the cache is within its size.
    Prune {
        #[command(flatten)]
        cache: HostCacheArgs,
    },
    /// Remove every chunk; processes reading remote images fetch again what they need.
    Clear {
        #[command(flatten)]
        cache: HostCacheArgs,
    },
}

/// The cache the flags or the environment name, or an error saying how to name one.
fn cache(args: &HostCacheArgs) -> Result<HostCacheOptions> {
    args.options().context(
        "no cache on disk is in use (--remote-cache-dir=none or QED_CACHE_DIR=none, or \
         neither HOME nor XDG_CACHE_HOME is set): name one with --remote-cache-dir DIR",
    )
}

/// Runs `qed cache`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    match a.action {
        Action::Info { output, cache: c } => info(&cache(&c)?, output),
        Action::Prune { cache: c } => {
            let c = cache(&c)?;
            let r = prune_host_cache(&c.dir, c.max_bytes)
                .with_context(|| format!("could not prune the cache in {}", c.dir.display()))?;
            done(&r);
            Ok(0)
        }
        Action::Clear { cache: c } => {
            let c = cache(&c)?;
            let r = clear_host_cache(&c.dir)
                .with_context(|| format!("could not clear the cache in {}", c.dir.display()))?;
            done(&r);
            Ok(0)
        }
    }
}

fn done(r: &PruneReport) {
    println!(
        "Removed {} chunks ({}); {} kept.",
        r.removed_chunks,
        human_size(r.removed_bytes),
        human_size(r.kept_bytes)
    );
}

fn seconds_ago(t: Option<SystemTime>) -> Option<u64> {
    t.map(|t| t.elapsed().map_or(0, |d| d.as_secs()))
}

fn info(c: &HostCacheOptions, output: Output) -> Result<u8> {
    let info = host_cache_info(&c.dir)
        .with_context(|| format!("could not read the cache in {}", c.dir.display()))?;
    match output {
        Output::Json => {
            let objects: Vec<_> = info
                .objects
                .iter()
                .map(|o| {
                    json!({
                        "name": o.name,
                        "key": o.key,
                        "size": o.size,
                        "chunk-size": o.chunk_size,
                        "bytes": o.bytes,
                        "chunks": o.chunks,
                        "last-used-seconds-ago": seconds_ago(o.last_used),
                        "in-use": o.in_use,
                    })
                })
                .collect();
            let j = json!({
                "directory": info.dir,
                "limit": c.max_bytes,
                "bytes": info.bytes,
                "chunks": info.chunks,
                "objects": objects,
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        Output::Human => {
            println!("cache directory: {}", info.dir.display());
            println!("size limit: {}", human_size(c.max_bytes));
            println!(
                "used: {} in {} chunks of {} objects",
                human_size(info.bytes),
                info.chunks,
                info.objects.len()
            );
            for o in &info.objects {
                let ago =
                    seconds_ago(o.last_used).map_or("never".to_string(), |s| format!("{s} s ago"));
                println!(
                    "{}: {} in {} chunks of {}, last used {ago}{}",
                    o.name,
                    human_size(o.bytes),
                    o.chunks,
                    human_size(o.chunk_size),
                    if o.in_use { ", in use" } else { "" }
                );
                println!("  {}", o.key.replace('\n', ", "));
            }
        }
    }
    Ok(0)
}
