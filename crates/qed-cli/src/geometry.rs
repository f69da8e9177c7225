//! The `-o key=value,...` options of an image to create.

use anyhow::{bail, Result};

/// The `-o` keys a command that only lays out a QED image takes (`measure`).
pub const GEOMETRY_KEYS: &[&str] = &["cluster_size", "table_size"];
/// The `-o` keys of `convert`: the geometry, and the backing file as `-B` and `-F` give it.
pub const CONVERT_KEYS: &[&str] = &["cluster_size", "table_size", "backing_file", "backing_fmt"];
/// The `-o` keys of `convert --in-place`: only a raw file's new cluster size.
pub const IN_PLACE_KEYS: &[&str] = &["cluster_size"];
/// The `-o` keys of `create`: those of `convert`, and the size.
pub const CREATE_KEYS: &[&str] = &[
    "cluster_size",
    "table_size",
    "backing_file",
    "backing_fmt",
    "size",
];

/// The `-o key=value,...` options of a QED image to create. A key given twice takes its
/// last value, as qemu-img does.
#[derive(Default)]
pub struct CreateGeometry {
    /// `cluster_size=SIZE`.
    pub cluster_size: Option<u32>,
    /// `table_size=N`.
    pub table_size: Option<u32>,
    /// `backing_file=NAME`.
    pub backing_file: Option<String>,
    /// `backing_fmt=FMT`.
    pub backing_fmt: Option<String>,
    /// `size=SIZE`.
    pub size: Option<u64>,
}

impl CreateGeometry {
    /// Parses every `-o` list given, refusing a key outside `allowed` (one of
    /// [`GEOMETRY_KEYS`], [`CONVERT_KEYS`], [`CREATE_KEYS`]) by name: a key taken and
    /// ignored would leave an image other than the one asked for.
    pub fn parse(lists: &[String], allowed: &[&str], command: &str) -> Result<Self> {
        use anyhow::Context;
        let mut g = Self::default();
        for list in lists {
            for kv in list.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("invalid option '{kv}': expected key=value"))?;
                if !allowed.contains(&k) {
                    bail!(
                        "invalid -o option '{k}': {command} takes {}",
                        allowed.join(", ")
                    );
                }
                match k {
                    "cluster_size" => {
                        g.cluster_size = Some(
                            u32::try_from(crate::units::parse_size(v)?)
                                .ok()
                                .with_context(|| format!("cluster_size {v} is too large"))?,
                        )
                    }
                    "table_size" => {
                        g.table_size = Some(v.parse().with_context(|| {
                            format!("invalid table_size '{v}': expected 1 to 16")
                        })?)
                    }
                    "backing_file" => g.backing_file = Some(v.to_string()),
                    "backing_fmt" => g.backing_fmt = Some(v.to_string()),
                    "size" => g.size = Some(crate::units::parse_size(v)?),
                    _ => bail!("invalid -o option '{k}'"),
                }
            }
        }
        Ok(g)
    }

    /// Sets the geometry given (the rest stays at its default).
    pub fn apply(&self, opts: &mut qed::CreateOptions) {
        if let Some(c) = self.cluster_size {
            opts.cluster_size = c;
        }
        if let Some(t) = self.table_size {
            opts.table_size = t;
        }
    }
}
