//! The `--remote-*` options: how images named by http, https and s3 URLs are read. One
//! struct, flattened into every command that opens an image, so that each command takes
//! the same flags and each flag is checked in one place.

use crate::units::parse_size;
use qed::{
    HostCacheOptions, OpenOptions, RemoteOptions, RemoteReport, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
use std::path::PathBuf;
use std::time::Duration;

/// Longest timeout or deadline accepted: a day is beyond any use, and keeps the
/// arithmetic on instants small.
const MAX_SECS: f64 = 86_400.0;

/// Longest wait for a connection to open, when the request timeout is longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How remote images are read (their defaults: the library's). The fields are named
/// after their flags, as clap's argument ids must not clash with a command's own
/// (`serve --cache`).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Remote images (http, https, s3 URLs)")]
pub struct RemoteArgs {
    /// Longest one request may take, in seconds, connecting included [default: 30].
    #[arg(long = "remote-timeout", value_name = "SECS", value_parser = parse_timeout)]
    remote_timeout: Option<Duration>,
    /// How long a server may go without answering, retries included, before reads
    /// fail, in seconds [default: 120].
    #[arg(long = "remote-deadline", value_name = "SECS", value_parser = parse_deadline)]
    remote_deadline: Option<Duration>,
    /// Requests one read may have in flight at once, and readahead requests of all
    /// sequential readers together (for an upload to S3: parts sent at once), 1 to 64
    /// [default: 8].
    #[arg(long = "remote-connections", value_name = "N", value_parser = parse_connections)]
    remote_connections: Option<usize>,
    /// Bytes fetched per chunk (reads are widened to whole chunks, which are cached): a
    /// power of two from 64k to 16M [default: 64k].
    #[arg(long = "remote-chunk-size", value_name = "SIZE", value_parser = parse_chunk_size)]
    remote_chunk_size: Option<u32>,
    /// Memory for cached chunks [default: 64M].
    #[arg(long = "remote-cache", value_name = "SIZE", value_parser = parse_cache)]
    remote_cache: Option<usize>,
    /// Bytes first fetched ahead of a read that continues an earlier one; 0 for none
    /// [default: 2M]. Each further read that continues it doubles this, in the
    /// background, up to --remote-readahead-max.
    #[arg(long = "remote-readahead", value_name = "SIZE", value_parser = parse_readahead)]
    remote_readahead: Option<u64>,
    /// Most bytes fetched ahead of one sequential reader; a quarter of --remote-cache at
    /// most, whatever is given [default: 256M].
    #[arg(long = "remote-readahead-max", value_name = "SIZE", value_parser = parse_readahead_max)]
    remote_readahead_max: Option<u64>,
    #[command(flatten)]
    host_cache: HostCacheArgs,
}

/// Where the cache on disk is, and how large it may grow: part of every command's
/// remote options, and `qed cache`'s own.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HostCacheArgs {
    /// The cache on disk shared by every qed process of the host, so that each byte of a
    /// remote image is fetched once; `none` for no cache [default: $QED_CACHE_DIR, else
    /// $XDG_CACHE_HOME/qed, else ~/.cache/qed].
    #[arg(long = "remote-cache-dir", value_name = "DIR|none")]
    remote_cache_dir: Option<PathBuf>,
    /// Most bytes the cache on disk keeps; past it, the least recently used chunks go
    /// [default: 10G].
    #[arg(long = "remote-cache-size", value_name = "SIZE", value_parser = parse_cache_size)]
    remote_cache_size: Option<u64>,
}

impl RemoteArgs {
    /// The library's options, with what was given in place of its defaults.
    pub fn options(&self) -> RemoteOptions {
        let mut o = RemoteOptions {
            // Once when a server stops answering and once when it is back: a wait of
            // up to the deadline is otherwise silent.
            report: RemoteReport::new(|message| {
                if message.contains("retrying until") {
                    eprintln!("qed: {message} (--remote-deadline)")
                } else {
                    eprintln!("qed: {message}")
                }
            }),
            ..RemoteOptions::default()
        };
        if let Some(t) = self.remote_timeout {
            o.request_timeout = t;
            // The request's timeout covers connecting too: a longer connect timeout
            // would never fire.
            o.connect_timeout = CONNECT_TIMEOUT.min(t);
        }
        if let Some(d) = self.remote_deadline {
            o.deadline = d;
        }
        if let Some(c) = self.remote_connections {
            o.connections = c;
        }
        if let Some(c) = self.remote_chunk_size {
            o.chunk_size = c;
        }
        if let Some(c) = self.remote_cache {
            o.cache_bytes = c;
        }
        if let Some(r) = self.remote_readahead {
            o.readahead = r;
        }
        if let Some(r) = self.remote_readahead_max {
            o.readahead_max = r;
        }
        o.host_cache = self.host_cache.options();
        o
    }

    /// Options for a read-only open.
    pub fn read_only(&self) -> OpenOptions {
        OpenOptions {
            remote: self.options(),
            ..OpenOptions::read_only()
        }
    }

    /// Options for a read-write open (backing files stay read-only).
    pub fn read_write(&self) -> OpenOptions {
        OpenOptions {
            remote: self.options(),
            ..OpenOptions::default()
        }
    }
}

impl HostCacheArgs {
    /// The cache on disk these flags (else the environment) ask for; `None` for none.
    pub fn options(&self) -> Option<HostCacheOptions> {
        let mut cache = match &self.remote_cache_dir {
            Some(d) if d.as_os_str() == "none" => None,
            Some(d) => Some(HostCacheOptions {
                dir: d.clone(),
                max_bytes: HostCacheOptions::DEFAULT_MAX_BYTES,
            }),
            None => HostCacheOptions::from_env(),
        }?;
        if let Some(max) = self.remote_cache_size {
            cache.max_bytes = max;
        }
        Some(cache)
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_SECS => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "expected seconds above 0 and at most {MAX_SECS}, such as 30 or 0.5"
        )),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_secs(s)
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    parse_secs(s)
}

fn parse_connections(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err("expected a number from 1 to 64".into()),
    }
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    match u32::try_from(v) {
        Ok(v) if v.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&v) => Ok(v),
        _ => Err(format!(
            "{v} bytes: a chunk is a power of two from 64k to 16M ({MIN_CHUNK_SIZE} to \
             {MAX_CHUNK_SIZE} bytes)"
        )),
    }
}

fn parse_cache(s: &str) -> Result<usize, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    // The cache holds at least one chunk whatever is asked; more than the address
    // space cannot be had.
    usize::try_from(v)
        .ok()
        .filter(|&v| v <= isize::MAX as usize)
        .ok_or_else(|| format!("{v} bytes is more memory than this machine can address"))
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_readahead(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    // The first window only: it grows from there, within the cache; beyond 1 GiB is a
    // typo.
    if v > 1 << 30 {
        return Err(format!("{v} bytes: at most 1G"));
    }
    Ok(v)
}

fn parse_readahead_max(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    // The cache bounds it anyway; beyond 16 GiB is a typo.
    if v == 0 || v > 16 << 30 {
        return Err(format!(
            "{v} bytes: from 1 to 16G (--remote-readahead 0 turns readahead off)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        remote: RemoteArgs,
    }

    fn parse(args: &[&str]) -> Result<RemoteOptions, String> {
        Cli::try_parse_from(std::iter::once("qed").chain(args.iter().copied()))
            .map(|c| c.remote.options())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn given_values_replace_the_defaults() {
        let given = parse(&[]).unwrap();
        assert_ne!(
            given.report,
            RemoteReport::default(),
            "messages are printed"
        );
        assert_eq!(given.host_cache, HostCacheOptions::from_env());
        assert_eq!(
            RemoteOptions {
                report: RemoteReport::default(),
                host_cache: None,
                ..given
            },
            RemoteOptions::default()
        );
        let o = parse(&[
            "--remote-timeout",
            "2.5",
            "--remote-deadline=7",
            "--remote-connections",
            "16",
            "--remote-chunk-size",
            "1M",
            "--remote-cache",
            "8M",
            "--remote-readahead",
            "0",
            "--remote-readahead-max",
            "32M",
            "--remote-cache-dir",
            "/var/cache/q",
            "--remote-cache-size=1G",
        ])
        .unwrap();
        assert_eq!(
            o.host_cache,
            Some(HostCacheOptions {
                dir: "/var/cache/q".into(),
                max_bytes: 1 << 30
            })
        );
        assert_eq!(
            parse(&["--remote-cache-dir=none", "--remote-cache-size=1G"])
                .unwrap()
                .host_cache,
            None
        );
        assert_eq!(o.request_timeout, Duration::from_millis(2500));
        assert_eq!(o.connect_timeout, Duration::from_millis(2500));
        assert_eq!(o.deadline, Duration::from_secs(7));
        assert_eq!(o.connections, 16);
        assert_eq!(o.chunk_size, 1 << 20);
        assert_eq!(o.cache_bytes, 8 << 20);
        assert_eq!(o.readahead, 0);
        assert_eq!(o.readahead_max, 32 << 20);
        assert_eq!(
            parse(&["--remote-timeout", "60"]).unwrap().connect_timeout,
            CONNECT_TIMEOUT
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        for (flag, value) in [
            ("--remote-timeout", "0"),
            ("--remote-timeout", "-1"),
            ("--remote-timeout", "NaN"),
            ("--remote-timeout", "inf"),
            ("--remote-timeout", "1e9"),
            ("--remote-deadline", "soon"),
            ("--remote-connections", "0"),
            ("--remote-connections", "65"),
            ("--remote-chunk-size", "100k"),
            ("--remote-chunk-size", "32k"),
            ("--remote-chunk-size", "32M"),
            ("--remote-chunk-size", "16E"),
            ("--remote-cache", "lots"),
            ("--remote-readahead", "2G"),
            ("--remote-readahead-max", "0"),
            ("--remote-readahead-max", "17G"),
            ("--remote-readahead-max", "much"),
            ("--remote-cache-size", "big"),
        ] {
            // `=`: a value such as -1 is not taken for a flag.
            let e = parse(&[&format!("{flag}={value}")]).unwrap_err();
            assert!(e.contains(flag) && e.contains(value), "{flag} {value}: {e}");
        }
    }
}
