//! The products in bf16 and fp32 on both kernel sets: oneDNN's (loaded at
//! run time; ./ci.sh installs libdnnl2) and the built-in ones. Precision
//! and kernels are process-wide, so these tests take turns.

use model::gemm::{self, Kernels, Precision};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Deterministic values in [-1, 1) that are not bf16-exact.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The three products of a layer, exactly (f64) over the given factor
/// values: `nt` with B stored [n,k], `nn` with B [k,n], `tn` with A [k,m].
fn exact(kind: &str, m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|p| {
                    let x = if kind == "tn" { a[p * m + i] } else { a[i * k + p] };
                    let y = if kind == "nt" { b[j * k + p] } else { b[p * n + j] };
                    f64::from(x) * f64::from(y)
                })
                .sum();
        }
    }
    c
}

fn run<'a, 'b>(
    kind: &str,
    (m, k, n): (usize, usize, usize),
    a: impl Into<gemm::Values<'a>>,
    b: impl Into<gemm::Values<'b>>,
    c: &mut [f32],
    accumulate: bool,
) {
    match kind {
        "nt" => gemm::matmul_nt(m, k, n, a, b, c, accumulate),
        "nn" => gemm::matmul_nn(m, k, n, a, b, c, accumulate),
        _ => gemm::matmul_tn(m, k, n, a, b, c, accumulate),
    }
}

/// Largest error over the scale of the sum (k products of values up to 1:
/// sqrt(k) for random signs).
fn worst(c: &[f32], want: &[f64], k: usize) -> f64 {
    c.iter().zip(want).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max) / (k as f64).sqrt()
}

/// Shapes with blocks, remainders and a weight gradient summed over more
/// rows than one chunk.
const SHAPES: [(usize, usize, usize); 5] = [(3, 5, 7), (300, 70, 129), (64, 600, 40), (513, 96, 260), (1, 1, 1)];

/// Every shape and layout in `precision` with `asked` kernels, which run
/// as `runs` (oneDNN's bf16 falls back where this CPU has none).
fn check_all(precision: Precision, asked: Kernels, runs: Kernels) {
    gemm::set_precision(precision);
    gemm::set_kernels(Some(asked));
    assert_eq!(gemm::kernels_for(precision), runs);
    let kernels = runs;
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        for kind in ["nt", "nn", "tn"] {
            let (a, b) = (values(m * k, s as u64), values(k * n, 100 + s as u64));
            let rounded = |v: &[f32]| v.iter().map(|&x| gemm::round_to_bf16(x)).collect::<Vec<_>>();
            let seen = match precision {
                Precision::Fp32 => exact(kind, m, k, n, &a, &b),
                Precision::Bf16 => exact(kind, m, k, n, &rounded(&a), &rounded(&b)),
            };
            let mut c = vec![f32::NAN; m * n];
            run(kind, (m, k, n), &a, &b, &mut c, false);
            // The factors as the kernels see them, summed in fp32.
            let err = worst(&c, &seen, k);
            assert!(err < 1e-6, "{precision:?} {kernels:?} {kind} {m}x{k}x{n}: error {err:e} over fp32 sums");
            // bf16 against the fp32 product: the rounding of the factors.
            let err = worst(&c, &exact(kind, m, k, n, &a, &b), k);
            let bound = if precision == Precision::Bf16 { 1e-2 } else { 1e-6 };
            assert!(err < bound, "{precision:?} {kernels:?} {kind} {m}x{k}x{n}: {err:e} from the fp32 product");
            // Accumulating adds the same product again.
            let once = c.clone();
            run(kind, (m, k, n), &a, &b, &mut c, true);
            assert!(
                c.iter().zip(&once).all(|(x, y)| (x - 2.0 * y).abs() <= 1e-5 * (1.0 + y.abs())),
                "{kind} accumulate"
            );
        }
    }
}

fn onednn() -> &'static gemm::onednn::OneDnn {
    gemm::onednn::get().unwrap_or_else(|e| panic!("{e} (./ci.sh installs it)"))
}

/// The kernels bf16 products run on when oneDNN is asked for: oneDNN
/// where it has a bf16 matmul for this CPU (it must, on one with bf16
/// units), else the built-in ones, with a line saying so.
fn onednn_bf16_kernels() -> Kernels {
    match onednn().bf16() {
        Ok(()) => Kernels::OneDnn,
        Err(why) => {
            assert!(!gemm::cpu_has_bf16_units(), "this CPU has bf16 units but {why}");
            eprintln!("{why}: bf16 products fall back to the built-in kernels, checked instead");
            Kernels::Builtin
        }
    }
}

#[test]
fn bf16_products_on_onednn_are_the_rounded_factors_summed_in_fp32() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bf16_kernels = onednn_bf16_kernels();
    gemm::set_kernels(Some(Kernels::OneDnn));
    assert_eq!(gemm::kernels_for(Precision::Bf16), bf16_kernels, "asked for oneDNN");
    check_all(Precision::Bf16, Kernels::OneDnn, bf16_kernels);
    check_all(Precision::Fp32, Kernels::OneDnn, Kernels::OneDnn);
    gemm::set_precision(Precision::Fp32);
    gemm::set_kernels(None);
}

#[test]
fn without_onednn_bf16_runs_the_builtin_kernels_on_rounded_factors() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    check_all(Precision::Bf16, Kernels::Builtin, Kernels::Builtin);
    check_all(Precision::Fp32, Kernels::Builtin, Kernels::Builtin);
    gemm::set_precision(Precision::Fp32);
}

/// The bits of the three products of one shape in bf16 on the kernels
/// bf16 runs on when oneDNN is asked for (oneDNN, or the built-in ones
/// where its oneDNN has no bf16 matmul), called from this (non-rayon)
/// thread: each runs on a team of as many threads as rayon's pool has.
/// (oneDNN's fp32 products on an AVX2-only AMD EPYC gave other bits on 3
/// threads than on 1 and 2 here; docs/kernels.md.)
fn product_bits() -> u64 {
    gemm::set_precision(Precision::Bf16);
    gemm::set_kernels(Some(Kernels::OneDnn));
    assert_eq!(gemm::kernels_for(Precision::Bf16), onednn_bf16_kernels());
    let (m, k, n) = (700, 600, 300);
    let (a, b) = (values(m * k, 7), values(k * n, 8));
    // FNV-1a over every value's bits.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for kind in ["nt", "nn", "tn"] {
        let mut c = vec![0.0; m * n];
        run(kind, (m, k, n), &a, &b, &mut c, false);
        for v in c {
            hash = (hash ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
    }
    gemm::set_precision(Precision::Fp32);
    hash
}

/// Set in the copies of this test binary the test below starts.
const CHILD: &str = "SWITCHYARD_GEMM_THREADS_CHILD";

/// The team size follows rayon's pool, which is fixed per process: the
/// products run in copies of this test binary with `RAYON_NUM_THREADS` 1,
/// 2 and 3, each printing their bits.
#[test]
fn bf16_products_do_not_depend_on_the_number_of_threads() {
    let name = "bf16_products_do_not_depend_on_the_number_of_threads";
    if std::env::var_os(CHILD).is_some() {
        // The copy's part: print the bits for the parent to compare.
        onednn();
        println!("bits {:x} on {} threads", product_bits(), rayon::current_num_threads());
        return;
    }
    onednn();
    let exe = std::env::current_exe().unwrap();
    let bits: Vec<String> = (1..=3)
        .map(|threads| {
            let out = std::process::Command::new(&exe)
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "the copy on {threads} threads failed: {text}");
            // The harness prints the test's name on the same line first.
            let line =
                text.split("bits ").nth(1).and_then(|l| l.lines().next()).unwrap_or_else(|| panic!("no bits: {text}"));
            assert!(line.ends_with(&format!("on {threads} threads")), "{line}");
            line.split_whitespace().next().unwrap().to_string()
        })
        .collect();
    assert!(bits.iter().all(|b| *b == bits[0]), "the products differ with the thread count: {bits:?}");
}

/// The bits of `v`.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `check` on both kernel sets in both precisions, taking its turn, and
/// the process's settings back to their defaults after.
fn in_every_setting(check: impl Fn(Kernels, Precision)) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    onednn();
    for kernels in [Kernels::OneDnn, Kernels::Builtin] {
        for precision in [Precision::Fp32, Precision::Bf16] {
            gemm::set_kernels(Some(kernels));
            gemm::set_precision(precision);
            // The kernels that run (oneDNN's bf16 falls back on AVX2).
            check(gemm::kernels_for(precision), precision);
        }
    }
    gemm::set_precision(Precision::Fp32);
    gemm::set_kernels(None);
}

/// A factor converted once ([`gemm::prepare`]) or stored in bf16 where it
/// is computed ([`gemm::FactorElement`]) gives the bits of the conversion
/// each product does on its own, in every layout, on both kernel sets, and
/// in fp32 a prepared factor is the values themselves.
#[test]
fn factors_converted_once_give_the_bits_of_per_product_conversion() {
    in_every_setting(|kernels, precision| {
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            for kind in ["nt", "nn", "tn"] {
                let (a, b) = (values(m * k, s as u64), values(k * n, 100 + s as u64));
                let mut direct = vec![0.0; m * n];
                run(kind, (m, k, n), &a, &b, &mut direct, false);
                let (pa, pb) = (gemm::prepare(&a), gemm::prepare(&b));
                assert_eq!(matches!(pa, gemm::Prepared::Bf16(_)), precision == Precision::Bf16);
                let stored: Vec<gemm::Bf16> = a.iter().map(|&x| gemm::FactorElement::from_f32(x)).collect();
                let mut once = vec![0.0; m * n];
                let mut from_loop = vec![0.0; m * n];
                run(kind, (m, k, n), &pa, &pb, &mut once, false);
                run(kind, (m, k, n), &stored, &b, &mut from_loop, false);
                let what = format!("{kernels:?} {precision:?} {kind} {m}x{k}x{n}");
                assert_eq!(bits(&direct), bits(&once), "prepared factors, {what}");
                if precision == Precision::Bf16 {
                    assert_eq!(bits(&direct), bits(&from_loop), "a factor stored in bf16, {what}");
                }
            }
        }
    });
}

/// A product into a new vector (written once, not zero-filled first) has
/// the bits of the same product into a zeroed buffer, on both kernel sets
/// and in both precisions, including the padded row tail and `k = 0`.
#[test]
fn products_into_new_vectors_equal_products_into_zeroed_ones() {
    in_every_setting(|kernels, precision| {
        for (s, &(m, k, n)) in SHAPES.iter().chain(&[(4, 0, 3)]).enumerate() {
            let (a, b) = (values(m * k, s as u64), values(k * n, 100 + s as u64));
            let what = format!("{kernels:?} {precision:?} {m}x{k}x{n}");
            // A freed block of NaNs of the same size, which malloc is
            // likely to hand out next: a value left unwritten shows.
            let dirty = || drop(vec![f32::NAN; m * n]);
            let mut zeroed = vec![0.0; m * n];
            run("nt", (m, k, n), &a, &b, &mut zeroed, false);
            dirty();
            assert_eq!(bits(&gemm::matmul_nt_new(m, k, n, &a, &b)), bits(&zeroed), "nt {what}");
            run("nn", (m, k, n), &a, &b, &mut zeroed, false);
            dirty();
            assert_eq!(bits(&gemm::matmul_nn_new(m, k, n, &a, &b)), bits(&zeroed), "nn {what}");
        }
    });
}
