//! `--shard I/N`: which inputs of a list a task takes.

use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (0-based): the inputs whose position `i` in the full list has
/// `i % count == index`. Which inputs a shard takes depends on `(I, N)` and the list alone, so N
/// copies of one command, started anywhere in any order, cover the list exactly once; and the
/// round robin spreads slow and fast inputs evenly over the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// The most shards a list is split into.
pub const MAX_SHARDS: usize = 1_000_000;

impl Shard {
    /// The whole list as one shard (`0/1`).
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, checked.
    pub fn new(index: usize, count: usize) -> Result<Shard, String> {
        if count == 0 || count > MAX_SHARDS {
            return Err(format!("{index}/{count}: the shard count must be 1 to {MAX_SHARDS}"));
        }
        if index >= count {
            return Err(format!("{index}/{count}: shards are numbered from 0, so give 0 to {} (Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-{})", count - 1, count - 1));
        }
        Ok(Shard { index, count })
    }

    /// Whether this shard takes the input at position `i` of the full list.
    pub fn takes(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// The shard that takes position `i`.
    pub fn of(i: usize, count: usize) -> Shard {
        Shard { index: i % count, count }
    }

    /// How many of `len` inputs this shard takes.
    pub fn len_of(&self, len: usize) -> usize {
        len / self.count + usize::from(len % self.count > self.index)
    }

    /// `NAME-I-of-N.EXT`: this shard's file of a run's folder.
    pub fn file_name(&self, name: &str, ext: &str) -> String {
        format!("{name}-{}-of-{}.{ext}", self.index, self.count)
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let parse = |part: &str| part.trim().parse::<usize>().map_err(|_| format!("{s:?}: give the shard as I/N, two whole numbers with 0 <= I < N (e.g. 0/4)"));
        let (i, n) = s.split_once('/').ok_or_else(|| format!("{s:?}: give the shard as I/N (e.g. 0/4)"))?;
        Shard::new(parse(i)?, parse(n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_list_once_and_evenly() {
        for len in [0, 1, 7, 100] {
            for n in [1, 3, 4, 8] {
                let mut seen = vec![0; len];
                for s in 0..n {
                    let shard = Shard::new(s, n).unwrap();
                    let taken: Vec<usize> = (0..len).filter(|&i| shard.takes(i)).collect();
                    assert_eq!(taken.len(), shard.len_of(len));
                    taken.iter().for_each(|&i| seen[i] += 1);
                }
                assert!(seen.iter().all(|&c| c == 1));
            }
        }
    }

    #[test]
    fn shard_specs_are_parsed_and_checked() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "a/2", "3", "-1/4", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert!("4/4".parse::<Shard>().unwrap_err().contains("0 to 3"));
    }
}
