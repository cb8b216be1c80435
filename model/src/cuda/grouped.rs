//! The host side of a grouped GEMM call (`cublasGemmGroupedBatchedEx`): which problems go in,
//! in which arrays. Pure, so it is tested in every build; `gpu::grouped_gemm` makes the call.

use crate::{Error, Result};

/// Problems of one shape: for each `(a, b, c)` (device addresses of bf16 data), column-major
/// `C[m, n] = A^T B` with `A` stored `[k, m]` (row-major `[m, k]`: a weight) and `B` `[k, n]`
/// (row-major `[n, k]`: token rows). That is row-major `C^T = rows W^T`.
#[derive(Debug, Clone)]
pub struct GemmGroup {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub problems: Vec<(u64, u64, u64)>,
}

/// The address of element `offset` of a bf16 buffer at `base`.
pub fn bf16_at(base: u64, offset: usize) -> u64 {
    base + 2 * offset as u64
}

/// The host arrays of a grouped GEMM call, one entry per group (sizes) or per problem
/// (pointers): what the call is made of, apart from the device copies of the pointers.
#[derive(Debug, Default, PartialEq)]
pub struct Arrays {
    pub m: Vec<i32>,
    pub n: Vec<i32>,
    pub k: Vec<i32>,
    pub group_size: Vec<i32>,
    pub a: Vec<u64>,
    pub b: Vec<u64>,
    pub c: Vec<u64>,
}

/// Lays out the groups for cuBLAS, leaving out empty ones (an empty problem is an error
/// there). Sizes must fit its 32-bit interface.
pub fn arrays(groups: &[GemmGroup]) -> Result<Arrays> {
    let int = |v: usize| {
        i32::try_from(v)
            .map_err(|_| Error::InvalidInput(format!("grouped GEMM dimension {v} exceeds cuBLAS's 32-bit sizes")))
    };
    let mut out = Arrays::default();
    for g in groups
        .iter()
        .filter(|g| g.m > 0 && g.n > 0 && g.k > 0 && !g.problems.is_empty())
    {
        out.m.push(int(g.m)?);
        out.n.push(int(g.n)?);
        out.k.push(int(g.k)?);
        out.group_size.push(int(g.problems.len())?);
        for &(a, b, c) in &g.problems {
            out.a.push(a);
            out.b.push(b);
            out.c.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_problems_are_left_out_and_pointers_follow_the_groups() {
        let g = |m, n, k, problems: Vec<(u64, u64, u64)>| GemmGroup { m, n, k, problems };
        let host = arrays(&[
            g(8, 3, 4, vec![(1, 2, 3), (4, 5, 6)]),
            g(8, 0, 4, vec![(7, 8, 9)]),
            g(4, 3, 8, vec![(10, 11, 12)]),
            g(4, 3, 8, vec![]),
        ])
        .unwrap();
        assert_eq!(host.m, [8, 4]);
        assert_eq!(host.n, [3, 3]);
        assert_eq!(host.k, [4, 8]);
        assert_eq!(host.group_size, [2, 1]);
        assert_eq!(host.a, [1, 4, 10]);
        assert_eq!(host.c, [3, 6, 12]);
        assert!(arrays(&[g(1 << 31, 1, 1, vec![(0, 0, 0)])]).is_err());
        assert_eq!(bf16_at(0x1000, 3), 0x1006);
    }
}
