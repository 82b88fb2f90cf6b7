use ndarray::Array1;
use std::f64::consts::TAU;

/// A quadrature rule: ∫ f ≈ Σ_i weights[i] f(nodes[i]).
#[derive(Debug, Clone)]
pub struct Rule {
    /// Evaluation points.
    pub nodes: Array1<f64>,
    /// Weights, one per node.
    pub weights: Array1<f64>,
}

impl Rule {
    /// ∫ f ≈ Σ w_i f(x_i) for f evaluated at all nodes at once.
    pub fn integrate(&self, values: &Array1<f64>) -> f64 {
        self.weights.dot(values)
    }
}

/// Trapezoid rule with `n ≥ 2` equally spaced nodes on [a, b].
pub fn trapezoid(a: f64, b: f64, n: usize) -> Rule {
    assert!(
        n >= 2 && b > a,
        "a trapezoid rule needs n >= 2 nodes on a non-empty interval"
    );
    let h = (b - a) / (n - 1) as f64;
    let nodes = Array1::linspace(a, b, n);
    let mut weights = Array1::from_elem(n, h);
    weights[0] = h / 2.0;
    weights[n - 1] = h / 2.0;
    Rule { nodes, weights }
}

/// E f(U), U ~ N(0, 1), by the trapezoid rule on [−L, L] with spacing `h`.
///
/// For an integrand that is analytic times the Gaussian density the trapezoid rule converges
/// geometrically: the aliasing error is of order exp(−2π²/h²) (about 1e-86 at h = 0.1), and
/// cutting the tails at L = 10 drops less than 2e-23 of the mass.
pub fn standard_normal_rule(half_width: f64, h: f64) -> Rule {
    let n = (2.0 * half_width / h).round() as usize + 1;
    let plain = trapezoid(-half_width, half_width, n);
    let density = plain.nodes.mapv(|u| (-0.5 * u * u).exp() / TAU.sqrt());
    Rule {
        weights: plain.weights * density,
        nodes: plain.nodes,
    }
}
