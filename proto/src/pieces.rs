//! Assignment sets in bounded pieces. A node's set can outgrow one frame (many replicas with
//! large env values), so the hub sends a set that does not fit one piece as several
//! [`AssignmentPart`] frames on the control stream, each at most [`PIECE_BYTES`] of
//! assignments, and the agent puts them back together with an [`Assembler`]. No piece ever
//! comes near [`crate::codec::MAX_FRAME`], so no node can outgrow its channel; only a single
//! assignment larger than a frame cannot be sent, and [`split`] says which.
//!
//! Pure functions: the hub's session and the agent's link do the I/O.

use serde::{Deserialize, Serialize};

use crate::messages::{Assignment, AssignmentSet};

/// Assignments per piece, as encoded JSON: a piece is closed before it would pass this.
pub const PIECE_BYTES: usize = 4 * 1024 * 1024;

/// Room in a frame for a piece's own fields around its assignments.
const PIECE_OVERHEAD: usize = 4 * 1024;

/// Most pieces one set may have (a set of `MAX_PIECES` × [`PIECE_BYTES`] is 16 GiB): an
/// assembler refuses more rather than grow without bound.
pub const MAX_PIECES: u32 = 4096;

/// One piece of an assignment set: pieces `0..parts` of one generation, in order, on one
/// stream, make the set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentPart {
    pub generation: u64,
    /// The store the set comes from (see [`AssignmentSet::store`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store: String,
    pub part: u32,
    pub parts: u32,
    pub assignments: Vec<Assignment>,
    /// The set's [`AssignmentSet::kept_logs`], on every piece.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_logs: Vec<String>,
    /// The set's [`AssignmentSet::objects`], on every piece.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<crate::objects::ObjectVersion>,
    /// The set's [`AssignmentSet::network`], on every piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::messages::NodeNetwork>,
    /// The set's [`AssignmentSet::services`], on every piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<crate::service::ServiceTable>,
    /// The set's [`AssignmentSet::connection_liveness`], on every piece.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub connection_liveness: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    /// One assignment alone is larger than a frame may be.
    #[error("replica {replica} alone encodes to {bytes} bytes, over the {limit}-byte frame limit")]
    TooLarge { replica: String, bytes: usize, limit: usize },
    /// A set that would need more than [`MAX_PIECES`] pieces.
    #[error("the set needs {parts} pieces, over the limit of {MAX_PIECES}")]
    TooManyPieces { parts: usize },
    /// A piece out of order, of another shape than the pieces before it, or numbered past
    /// its own count.
    #[error("piece {part} of {parts} of generation {generation} arrived out of order")]
    OutOfOrder { generation: u64, part: u32, parts: u32 },
}

/// Splits `set` into pieces of at most [`PIECE_BYTES`] of assignments each (a larger
/// assignment gets a piece of its own, if it fits a frame). A set that fits one piece gives
/// one piece, also when it is empty.
pub fn split(set: &AssignmentSet) -> Result<Vec<AssignmentPart>, PieceError> {
    split_within(set, PIECE_BYTES, crate::codec::MAX_FRAME - PIECE_OVERHEAD)
}

fn split_within(set: &AssignmentSet, budget: usize, frame: usize) -> Result<Vec<AssignmentPart>, PieceError> {
    let mut groups: Vec<Vec<Assignment>> = vec![Vec::new()];
    let mut filled = 0usize;
    for a in &set.assignments {
        // Serializing a template cannot fail (string keys, no non-finite floats); count such
        // a one as too large rather than panic.
        let bytes = serde_json::to_vec(a).map_or(usize::MAX, |v| v.len() + 1);
        if bytes > frame {
            return Err(PieceError::TooLarge { replica: a.name.clone(), bytes, limit: frame });
        }
        let current = groups.last_mut().expect("groups is never empty");
        if !current.is_empty() && filled + bytes > budget {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += bytes;
        groups.last_mut().expect("groups is never empty").push(a.clone());
    }
    if groups.len() > MAX_PIECES as usize {
        return Err(PieceError::TooManyPieces { parts: groups.len() });
    }
    let parts = groups.len() as u32;
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(i, assignments)| AssignmentPart {
            generation: set.generation,
            store: set.store.clone(),
            part: i as u32,
            parts,
            assignments,
            kept_logs: set.kept_logs.clone(),
            objects: set.objects.clone(),
            network: set.network.clone(),
            services: set.services.clone(),
            connection_liveness: set.connection_liveness,
        })
        .collect())
}

/// Puts pieces back together. A piece of another generation than the set in progress starts
/// over (the hub moved on mid-set); a piece out of order is an error and drops what was
/// gathered.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<AssignmentPart>,
}

impl Assembler {
    /// Takes the next piece; returns the set when it was the last.
    pub fn push(&mut self, piece: AssignmentPart) -> Result<Option<AssignmentSet>, PieceError> {
        let bad =
            |p: &AssignmentPart| PieceError::OutOfOrder { generation: p.generation, part: p.part, parts: p.parts };
        if piece.parts == 0 || piece.parts > MAX_PIECES || piece.part >= piece.parts {
            self.pending = None;
            return Err(bad(&piece));
        }
        if piece.part == 0 {
            self.pending = None;
        }
        let mut gathered = match self.pending.take() {
            None if piece.part == 0 => AssignmentPart { assignments: Vec::new(), part: 0, ..piece.clone() },
            Some(p)
                if p.generation == piece.generation
                    && p.store == piece.store
                    && p.parts == piece.parts
                    && p.part + 1 == piece.part =>
            {
                p
            }
            _ => return Err(bad(&piece)),
        };
        gathered.part = piece.part;
        gathered.assignments.extend(piece.assignments);
        if gathered.part + 1 == gathered.parts {
            return Ok(Some(AssignmentSet {
                generation: gathered.generation,
                store: gathered.store,
                assignments: gathered.assignments,
                kept_logs: gathered.kept_logs,
                objects: gathered.objects,
                network: gathered.network,
                services: gathered.services,
                connection_liveness: gathered.connection_liveness,
            }));
        }
        self.pending = Some(gathered);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifests;

    fn set(n: usize, env_bytes: usize) -> AssignmentSet {
        let m = parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec: {runtime: wasm, image: r/w:1}\n",
        )
        .unwrap()
        .remove(0);
        let mut template = m.template();
        template.env.insert("BIG".into(), "x".repeat(env_bytes));
        let hash = template.hash();
        AssignmentSet {
            generation: 7,
            store: "s1".into(),
            assignments: (0..n)
                .map(|i| Assignment {
                    name: format!("w-{i}"),
                    workload: "w".into(),
                    template: template.clone(),
                    template_hash: hash.clone(),
                    attempt: (i % 2 == 1).then_some(2),
                })
                .collect(),
            // Carried on every piece, so the assembled set has it however it was split.
            kept_logs: vec!["finished-job".into()],
            objects: vec![crate::objects::ObjectVersion {
                kind: crate::objects::ObjectKind::Secret,
                name: "db".into(),
                version: 3,
                digest: "d".into(),
            }],
            network: Some(crate::messages::NodeNetwork {
                subnet: "10.42.3.0/24".parse().unwrap(),
                cluster_cidr: "10.42.0.0/16".parse().unwrap(),
            }),
            services: None,
            connection_liveness: true,
        }
    }

    fn assemble(parts: Vec<AssignmentPart>) -> AssignmentSet {
        let mut a = Assembler::default();
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            let out = a.push(p).unwrap();
            assert_eq!(out.is_some(), i + 1 == n, "the set is complete at the last piece only");
            if let Some(s) = out {
                return s;
            }
        }
        unreachable!()
    }

    #[test]
    fn a_small_or_empty_set_is_one_piece() {
        for s in [set(0, 0), set(3, 10)] {
            let parts = split(&s).unwrap();
            assert_eq!(parts.len(), 1);
            assert_eq!(assemble(parts), s);
        }
    }

    #[test]
    fn a_20_mb_set_travels_in_pieces_none_near_a_frame() {
        let s = set(20, 1 << 20);
        let parts = split(&s).unwrap();
        assert!(parts.len() >= 5, "{} pieces", parts.len());
        for p in &parts {
            let frame = crate::codec::encode(&p).unwrap();
            assert!(frame.len() <= PIECE_BYTES + (1 << 20) + PIECE_OVERHEAD, "piece of {} bytes", frame.len());
        }
        assert_eq!(assemble(parts), s);
    }

    #[test]
    fn an_assignment_larger_than_a_frame_is_named() {
        let s = set(2, 100);
        match split_within(&s, 50, 120) {
            Err(PieceError::TooLarge { replica, .. }) => assert_eq!(replica, "w-0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_generation_starts_over_and_disorder_is_refused() {
        let old = split_within(&set(4, 100), 200, 1 << 20).unwrap();
        let mut new = set(4, 100);
        new.generation = 8;
        let new_parts = split_within(&new, 200, 1 << 20).unwrap();
        assert!(old.len() > 2);
        let mut a = Assembler::default();
        assert_eq!(a.push(old[0].clone()).unwrap(), None);
        // The hub moved on mid-set: the new set's first piece starts over.
        let mut done = None;
        for p in new_parts.clone() {
            done = a.push(p).unwrap();
        }
        assert_eq!(done, Some(new));
        // A piece skipped, a foreign piece, a piece numbered past its count.
        let mut a = Assembler::default();
        a.push(new_parts[0].clone()).unwrap();
        assert!(a.push(new_parts[2].clone()).is_err());
        assert!(a.push(old[1].clone()).is_err());
        let bogus = AssignmentPart { part: 5, parts: 5, ..new_parts[0].clone() };
        assert!(a.push(bogus).is_err());
        let zero = AssignmentPart { part: 0, parts: 0, ..new_parts[0].clone() };
        assert!(a.push(zero).is_err());
    }
}
