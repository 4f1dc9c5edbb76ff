#![allow(clippy::unwrap_used, reason = "tests")]

use super::*;
use crate::assign::stable_hash;

fn close(got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "got {got}, want {want} ± {tol}");
}

fn moments(xs: &[f64]) -> Moments {
    let mut m = Moments::default();
    for x in xs {
        m.push(*x);
    }
    m
}

#[test]
fn distributions_match_tables() {
    close(normal_cdf(1.96), 0.975_002, 1e-6);
    close(normal_cdf(-1.0), 0.158_655, 1e-6);
    close(student_t_quantile(0.975, 1.0), 12.706_2, 1e-3);
    close(student_t_quantile(0.975, 10.0), 2.228_139, 1e-5);
    close(student_t_quantile(0.975, 30.0), 2.042_272, 1e-5);
    close(student_t_quantile(0.95, 1e9), 1.644_854, 1e-5);
    close(student_t_sf(2.228_139, 10.0), 0.025, 1e-6);
    close(chi_square_sf(3.841_459, 1.0), 0.05, 1e-6);
    close(chi_square_sf(5.991_465, 2.0), 0.05, 1e-6);
    close(chi_square_sf(10.0, 4.0), 0.040_428, 1e-6);
    close(chi_square_sf(30.0, 2.0), (-15f64).exp(), 1e-12);
    close(chi_square_sf(0.5, 3.0), 0.918_891, 1e-6);
}

#[test]
fn mean_interval_and_welch_match_textbook_values() {
    let a = moments(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let b = moments(&[2.0, 4.0, 6.0, 8.0, 10.0]);
    close(a.variance().unwrap(), 2.5, 1e-12);
    let i = a.interval(0.95).unwrap();
    // 3 ± t(0.975, 4) · √(2.5/5) = 3 ± 2.776445 · 0.707107
    close(i.low, 3.0 - 1.963_243, 1e-5);
    close(i.high, 3.0 + 1.963_243, 1e-5);
    // R: t.test(b, a): t = 1.8974, df = 5.8824, p-value = 0.1075
    let w = welch(&a, &b, 0.95).unwrap();
    close(w.diff, 3.0, 1e-12);
    close(w.df, 5.882_4, 1e-4);
    close(w.p_value, 0.107_5, 5e-4);
    assert!(w.low < 0.0 && w.high > 6.0 - 0.2);
    close(welch_one_sided(&a, &b, 0.0).unwrap(), w.p_value / 2.0, 1e-9);
    assert!(welch_one_sided(&a, &b, 3.0).unwrap() > 0.49);
    assert_eq!(welch(&a, &moments(&[1.0]), 0.95), None);

    let mut merged = moments(&[1.0, 2.0]);
    merged.merge(&moments(&[3.0, 4.0, 5.0]));
    assert_eq!(merged, a);
    // Constant arms: no variance, and the sign decides.
    let zero = moments(&[0.5, 0.5]);
    let one = moments(&[1.0, 1.0]);
    assert_eq!(welch(&zero, &one, 0.95).unwrap().p_value, 0.0);
    assert_eq!(welch(&zero, &zero, 0.95).unwrap().p_value, 1.0);
    assert_eq!(welch_one_sided(&zero, &one, 0.6), Some(1.0));
}

#[test]
fn chi_square_fit_flags_a_mismatch() {
    close(
        chi_square_fit(&[500, 500], &[1.0, 1.0]).unwrap(),
        1.0,
        1e-12,
    );
    // 50.5 % vs 49.5 % of 100 000 at 1:1: chi2 = 10, p = 0.00157.
    close(
        chi_square_fit(&[50_500, 49_500], &[1.0, 1.0]).unwrap(),
        0.001_565,
        1e-5,
    );
    // 51 % vs 49 %: chi2 = 40, p = 2.5e-10.
    assert!(chi_square_fit(&[51_000, 49_000], &[1.0, 1.0]).unwrap() < 1e-9);
    close(
        chi_square_fit(&[790, 210], &[4.0, 1.0]).unwrap(),
        chi_square_sf(0.625, 1.0),
        1e-12,
    );
    assert_eq!(chi_square_fit(&[0, 0], &[1.0, 1.0]), None);
    assert_eq!(chi_square_fit(&[3, 1], &[1.0, 0.0]), None);
    assert_eq!(chi_square_fit(&[3, 1, 1], &[1.0, 1.0, 0.0]), Some(0.0));
}

#[test]
fn unique_count_is_within_its_error() {
    for n in [0u64, 1, 10, 1_000, 100_000] {
        let mut u = UniqueCount::default();
        for i in 0..n {
            let key = format!("user-{i}");
            // Repeats do not count.
            u.add(stable_hash(&["e", &key]));
            u.add(stable_hash(&["e", &key]));
        }
        let estimate = u.estimate() as f64;
        let tolerance = (n as f64 * 0.1).max(0.5);
        assert!(
            (estimate - n as f64).abs() <= tolerance,
            "{n} keys estimated as {estimate}"
        );
        assert!(u.is_consistent());
    }
    let mut a = UniqueCount::default();
    let mut b = UniqueCount::default();
    for i in 0..500 {
        a.add(stable_hash(&[&i.to_string()]));
        b.add(stable_hash(&[&(i + 250).to_string()]));
    }
    a.merge(&b);
    close(a.estimate() as f64, 750.0, 25.0);
}
