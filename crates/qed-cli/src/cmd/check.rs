//! `qed check`.

use crate::Output;
use anyhow::Result;
use qed::Format;
use qed::RepairMode;
use qed::{CheckReport, Image, OpenOptions};
use serde::Serialize;
use std::path::PathBuf;

/// Check an image's metadata, as `qemu-img check`.
///
/// Exit codes: 0 clean, 1 the check could not run, 2 corruptions, 3 leaks only.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (qed).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Repair: `leaks` reclaims leaked clusters, `all` also fixes corruptions.
    #[arg(short = 'r', value_enum)]
    repair: Option<Repair>,
    /// Quiet: print nothing, in either output format; the exit code tells the result.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

/// What `-r` repairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Repair {
    /// Leaked clusters only.
    Leaks,
    /// Corruptions and leaks.
    All,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// `qemu-img check --output=json`'s keys; zero counts are left out as qemu-img does.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Json<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    total_clusters: u64,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: &'a str,
    format: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
}

fn print_repaired(r: &CheckReport) {
    for d in &r.details {
        println!("Repairing {d}");
    }
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
        if r.clusters_copied > 0 {
            println!(
                "    {} shared clusters were copied so that each owner has its own",
                r.clusters_copied
            );
        }
        if r.clusters_moved > 0 || r.bytes_truncated > 0 {
            println!(
                "    {} clusters were moved into leaked space; the file shrank by {} bytes",
                r.clusters_moved, r.bytes_truncated
            );
        }
        if r.leaks_punched > 0 {
            println!(
                "    {} leaked clusters could not be filled and were released as holes",
                r.leaks_punched
            );
        }
        println!("\nDouble checking the fixed image now...");
    }
}

fn print_human(r: &CheckReport) {
    for d in &r.details {
        println!("ERROR {d}");
    }
    let corruptions = r.corruptions;
    let leaks = r.leaks;
    if corruptions == 0 && leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if corruptions > 0 {
            println!(
                "\n{corruptions} errors were found on the image.\nData may be corrupted, or \
                 further writes to the image may corrupt it."
            );
        }
        if leaks > 0 {
            println!(
                "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data."
            );
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, 0.00% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64
        );
    }
}

/// Runs `qed check`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    let opts = OpenOptions {
        image: qed::ImageOptions {
            read_only: a.repair.is_none(),
            repair_on_open: false,
            ..a.share.apply(a.remote.read_write()).image
        },
        no_backing: true,
        ..a.share.apply(a.remote.read_write())
    };
    let mut image = Image::open(&a.file, &opts)?;
    let r = match a.repair {
        None => image.check()?,
        Some(mode) => {
            let mode = match mode {
                Repair::Leaks => RepairMode::Leaks,
                Repair::All => RepairMode::All,
            };
            let fixed = image.repair(mode)?;
            if a.output == Output::Human && !a.quiet {
                print_repaired(&fixed);
            }
            // Report the image as it is now, as qemu-img does after a repair.
            CheckReport {
                leaks_fixed: fixed.leaks_fixed,
                corruptions_fixed: fixed.corruptions_fixed,
                ..image.check()?
            }
        }
    };
    let name = a.file.display().to_string();
    match a.output {
        _ if a.quiet => {}
        Output::Json => {
            let j = Json {
                total_clusters: r.total_clusters,
                check_errors: r.check_errors,
                allocated_clusters: r.allocated_clusters,
                filename: &name,
                format: "qed",
                fragmented_clusters: r.fragmented_clusters,
                leaks: r.leaks,
                corruptions: r.corruptions,
                leaks_fixed: r.leaks_fixed,
                corruptions_fixed: r.corruptions_fixed,
            };
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        Output::Human => print_human(&r),
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}
