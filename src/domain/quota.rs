//! Quota modes: whether a data root enforces each volume's size with the filesystem's quotas, decided
//! from the configured mode and what the filesystem offers.
//!
//! - `auto` (default): enforce when the filesystem can (btrfs with quotas on; XFS or ext4 mounted with
//!   project quotas), else provision without a hard limit, as before;
//! - `required`: a root that cannot enforce serves no claims (zero capacity, claims handed back with
//!   a Warning saying what to enable);
//! - `off`: never set limits.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaMode {
    #[default]
    Auto,
    Required,
    Off,
}

impl FromStr for QuotaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(QuotaMode::Auto),
            "required" => Ok(QuotaMode::Required),
            "off" => Ok(QuotaMode::Off),
            other => Err(format!(
                "quota mode {other:?} is not one of auto, required, off"
            )),
        }
    }
}

impl fmt::Display for QuotaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuotaMode::Auto => "auto",
            QuotaMode::Required => "required",
            QuotaMode::Off => "off",
        })
    }
}

/// The quota mechanism a filesystem offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// A btrfs subvolume per volume with a qgroup limit on its referenced bytes.
    BtrfsQgroup,
    /// An XFS project per volume directory with a block hard limit.
    XfsProject,
    /// An ext4 project per volume directory with a block hard limit.
    Ext4Project,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::BtrfsQgroup => "btrfs-qgroup",
            Mechanism::XfsProject => "xfs-project",
            Mechanism::Ext4Project => "ext4-project",
        }
    }
}

/// What the filesystem under a root offers: a working mechanism, or why there is none (with what an
/// administrator would enable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Available(Mechanism),
    Unavailable(String),
}

/// What a root does with volume sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Every volume gets a hard limit equal to its size.
    Enforced(Mechanism),
    /// Sizes are accounted (no overcommit) but not enforced on disk; `reason` says why.
    Unlimited { reason: String },
    /// `required` without a working mechanism: the root serves no claims.
    Refusing { reason: String },
}

impl Enforcement {
    pub fn mechanism(&self) -> Option<Mechanism> {
        match self {
            Enforcement::Enforced(m) => Some(*m),
            _ => None,
        }
    }

    /// A short label for reports and metrics: the mechanism, `none` or `unavailable`.
    pub fn label(&self) -> &'static str {
        match self {
            Enforcement::Enforced(m) => m.name(),
            Enforcement::Unlimited { .. } => "none",
            Enforcement::Refusing { .. } => "unavailable",
        }
    }

    /// One line for logs and reports.
    pub fn describe(&self) -> String {
        match self {
            Enforcement::Enforced(m) => format!("sizes enforced with {}", m.name()),
            Enforcement::Unlimited { reason } => format!("sizes not enforced: {reason}"),
            Enforcement::Refusing { reason } => {
                format!("quota mode required but unavailable: {reason}")
            }
        }
    }
}

pub fn decide(mode: QuotaMode, offer: &Offer) -> Enforcement {
    match (mode, offer) {
        (QuotaMode::Off, _) => Enforcement::Unlimited {
            reason: "quota mode off".into(),
        },
        (_, Offer::Available(m)) => Enforcement::Enforced(*m),
        (QuotaMode::Auto, Offer::Unavailable(why)) => Enforcement::Unlimited {
            reason: why.clone(),
        },
        (QuotaMode::Required, Offer::Unavailable(why)) => Enforcement::Refusing {
            reason: why.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_offer_decide_enforcement() {
        let none =
            Offer::Unavailable("btrfs quotas are off: run `btrfs quota enable /mnt/data`".into());
        let btrfs = Offer::Available(Mechanism::BtrfsQgroup);
        let cases = [
            (QuotaMode::Auto, &btrfs, "btrfs-qgroup"),
            (QuotaMode::Auto, &none, "none"),
            (QuotaMode::Required, &btrfs, "btrfs-qgroup"),
            (QuotaMode::Required, &none, "unavailable"),
            (QuotaMode::Off, &btrfs, "none"),
            (QuotaMode::Off, &none, "none"),
        ];
        for (mode, offer, label) in cases {
            assert_eq!(decide(mode, offer).label(), label, "{mode} {offer:?}");
        }
        let refusing = decide(QuotaMode::Required, &none).describe();
        assert!(refusing.contains("btrfs quota enable"), "{refusing}");
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [QuotaMode::Auto, QuotaMode::Required, QuotaMode::Off] {
            assert_eq!(mode.to_string().parse::<QuotaMode>(), Ok(mode));
        }
        assert!(
            "strict"
                .parse::<QuotaMode>()
                .unwrap_err()
                .contains("auto, required, off")
        );
    }
}
