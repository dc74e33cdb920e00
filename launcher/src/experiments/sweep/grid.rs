//! `sweep.toml`: the axes of a sweep and their cartesian product.
//!
//! ```toml
//! steps = 20             # per point
//! warmup = 2             # steps left out of the means
//! zip = [["parallel.ranks", "train.global_batch_size"]]   # optional
//!
//! [axes]
//! parallel.ranks = [1, 2, 4]
//! model.n_experts = [8, 16]
//! train.global_batch_size = [8, 16, 32]
//! ```
//! Every key under `[axes]` is a job config key (dotted, as for `--set`).
//! Axes named together in a `zip` group advance in lockstep (one dimension
//! of the grid; weak scaling grows the batch with the ranks this way); the
//! others multiply. Axes are ordered by name, as TOML tables are.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// What `sweep.toml` holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    steps: u64,
    #[serde(default = "default_warmup")]
    warmup: u64,
    #[serde(default)]
    zip: Vec<Vec<String>>,
    axes: toml::Table,
}

fn default_warmup() -> u64 {
    2
}

/// One config key and the values it takes.
#[derive(Debug, Clone)]
pub struct Axis {
    pub key: String,
    pub values: Vec<toml::Value>,
}

/// The parsed grid: steps per point and its axes.
#[derive(Debug, Clone)]
pub struct Grid {
    pub steps: u64,
    pub warmup: u64,
    pub axes: Vec<Axis>,
    /// Groups of axis indices that advance together; every axis is in exactly one.
    pub dims: Vec<Vec<usize>>,
}

/// One point of the grid: a value per axis, in axis order.
#[derive(Debug, Clone)]
pub struct Point {
    pub values: Vec<(String, toml::Value)>,
}

impl Grid {
    /// Reads and checks a `sweep.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the grid {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the grid {}", path.display()))
    }

    /// Parses the text of a `sweep.toml`.
    pub fn parse(text: &str) -> Result<Self> {
        let file: GridFile = toml::from_str(text)?;
        if file.steps <= file.warmup {
            bail!("steps ({}) must be more than warmup ({})", file.steps, file.warmup);
        }
        let mut axes = Vec::new();
        flatten("", &file.axes, &mut axes)?;
        if axes.is_empty() {
            bail!("[axes] is empty: name at least one config key with a list of values, e.g. parallel.ranks = [1, 2]");
        }
        let index = |key: &str| {
            axes.iter()
                .position(|a: &Axis| a.key == key)
                .with_context(|| format!("zip names `{key}`, which is not under [axes]"))
        };
        let mut dims: Vec<Vec<usize>> = Vec::new();
        for group in &file.zip {
            let members = group.iter().map(|k| index(k)).collect::<Result<Vec<_>>>()?;
            if let Some(&first) = members.first() {
                for &m in &members {
                    if axes[m].values.len() != axes[first].values.len() {
                        bail!("zipped axes `{}` and `{}` need lists of the same length", axes[first].key, axes[m].key);
                    }
                    if dims.iter().flatten().any(|&d| d == m) {
                        bail!("axis `{}` is in more than one zip group", axes[m].key);
                    }
                }
                dims.push(members);
            }
        }
        for i in 0..axes.len() {
            if !dims.iter().flatten().any(|&d| d == i) {
                dims.push(vec![i]);
            }
        }
        dims.sort_by_key(|d| d[0]);
        Ok(Self { steps: file.steps, warmup: file.warmup, axes, dims })
    }

    /// Every point: the cartesian product of the dimensions, the last varying fastest.
    pub fn points(&self) -> Vec<Point> {
        let mut points = vec![Vec::<(usize, usize)>::new()];
        for dim in &self.dims {
            let len = self.axes[dim[0]].values.len();
            points = points
                .into_iter()
                .flat_map(|p| (0..len).map(move |v| (p.clone(), v)))
                .map(|(mut p, v)| {
                    p.extend(dim.iter().map(|&a| (a, v)));
                    p
                })
                .collect();
        }
        points
            .into_iter()
            .map(|mut picks| {
                picks.sort();
                let values =
                    picks.iter().map(|&(a, v)| (self.axes[a].key.clone(), self.axes[a].values[v].clone())).collect();
                Point { values }
            })
            .collect()
    }
}

/// `[axes]` may be written with dotted keys (nested tables) or quoted ones.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<Axis>) -> Result<()> {
    for (name, value) in table {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        match value {
            toml::Value::Table(inner) => flatten(&key, inner, out)?,
            toml::Value::Array(values) if !values.is_empty() => out.push(Axis { key, values: values.clone() }),
            _ => bail!("axis `{key}` needs a non-empty list of values, e.g. {key} = [1, 2]"),
        }
    }
    Ok(())
}

/// How a value is written on the command line (`--set key=VALUE`, TOML).
pub fn toml_text(value: &toml::Value) -> String {
    value.to_string()
}

/// How a value is shown in ids, tables and plots (strings without quotes).
pub fn plain_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Point {
    /// A stable id from the values, also the point's folder name:
    /// `model.n_experts=8,parallel.ranks=2`.
    pub fn id(&self) -> String {
        let id = self.values.iter().map(|(k, v)| format!("{k}={}", plain_text(v))).collect::<Vec<_>>().join(",");
        id.replace(['/', ' '], "_")
    }

    /// The `--set` assignments of this point.
    pub fn overrides(&self) -> Vec<String> {
        self.values.iter().map(|(k, v)| format!("{k}={}", toml_text(v))).collect()
    }

    /// `key=value key=value` for progress lines.
    pub fn label(&self) -> String {
        self.values.iter().map(|(k, v)| format!("{k}={}", plain_text(v))).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_of_axes_and_zipped_groups() {
        let grid = Grid::parse(
            "steps = 4\nzip = [[\"parallel.ranks\", \"train.global_batch_size\"]]\n\
             [axes]\nparallel.ranks = [1, 2]\ntrain.global_batch_size = [4, 8]\n\"model.n_experts\" = [4, 8, 16]\n",
        )
        .unwrap();
        let ids: Vec<String> = grid.points().iter().map(Point::id).collect();
        assert_eq!(ids.len(), 6, "{ids:?}");
        assert_eq!(ids[0], "model.n_experts=4,parallel.ranks=1,train.global_batch_size=4");
        assert_eq!(ids[1], "model.n_experts=4,parallel.ranks=2,train.global_batch_size=8");
        assert_eq!(grid.warmup, 2);
    }

    #[test]
    fn bad_grids_are_named() {
        let err = format!("{:#}", Grid::parse("steps = 2\n[axes]\nmodel.top_k = [1]\n").unwrap_err());
        assert!(err.contains("warmup"), "{err}");
        let err = format!("{:#}", Grid::parse("steps = 4\n[axes]\nmodel.top_k = 2\n").unwrap_err());
        assert!(err.contains("model.top_k"), "{err}");
        let err = format!(
            "{:#}",
            Grid::parse("steps = 4\nzip = [[\"a\", \"b\"]]\n[axes]\na = [1]\nb = [1, 2]\n").unwrap_err()
        );
        assert!(err.contains("same length"), "{err}");
    }
}
