//! Flat buffers: the variables of a `VarStore` as views of one contiguous buffer per kind and
//! device, so that LAMB and the EMA run a few whole-buffer kernels per step instead of a
//! dozen small ones per variable (docs/performance.md, "Flat buffers").
//!
//! [`FlatVars::of`] copies each variable into its place in a fresh buffer and then points the
//! variable at that place (`set_data` to `buffer.narrow(0, offset, n)` seen with the
//! variable's shape and strides, so a channels-last weight stays channels-last): every
//! handle to the variable (the network's layers, `VarStore::variables`) keeps working and
//! writes through to the buffer, and copying into a variable (`VarStore::copy`, checkpoint
//! loads) writes into the buffer. If the variables already are such views (a second caller:
//! `Lamb::new` and `Ema::new` on the same store) the existing buffer is reused.
//!
//! Layout of a group: the trainable variables LAMB adapts ([`crate::lamb::is_adapted`]),
//! then the trainable ones it excludes, then the others, each part sorted by name, each
//! variable starting on a 256-byte boundary (what cuDNN and vectorised kernels like) with the
//! padding between them zero. Padding is inert: its gradient, moments and weights stay zero,
//! it adds nothing to any norm, and the EMA of zero is zero.

use crate::error::{DdpmError, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Every variable starts on a multiple of this many bytes.
const ALIGN_BYTES: i64 = 256;

/// One variable's place in its group's buffer.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The variable's name in the `VarStore`.
    pub name: String,
    /// A handle to the variable (the same tensor the store holds).
    pub var: Tensor,
    /// First element in the buffer.
    pub offset: i64,
    /// Elements of the variable.
    pub numel: i64,
    /// Elements up to the next variable's offset (numel plus the padding after it).
    pub padded: i64,
    /// The variable's shape.
    pub shape: Vec<i64>,
    /// Its strides: the variable's own when its elements are dense in memory (contiguous,
    /// channels-last, any permutation), else the contiguous ones.
    pub strides: Vec<i64>,
    /// Whether the variable requires a gradient.
    pub trainable: bool,
    /// Whether LAMB adapts it (trust ratio, weight decay).
    pub adapt: bool,
}

impl Entry {
    /// This entry's part of a buffer laid out like its group's (`buffer` 1-D).
    pub fn view_of(&self, buffer: &Tensor) -> Result<Tensor> {
        // `as_strided` without an offset keeps the narrowed tensor's own storage offset.
        Ok(buffer.f_narrow(0, self.offset, self.numel)?.f_as_strided(
            self.shape.as_slice(),
            self.strides.as_slice(),
            None,
        )?)
    }
}

/// The variables of one kind and device.
#[derive(Debug)]
pub(crate) struct Group {
    /// The flat buffer every entry's variable is a view of.
    pub buffer: Tensor,
    /// The entries in layout order (adapted, excluded, not trainable).
    pub entries: Vec<Entry>,
    /// Elements of the adapted prefix (padding included).
    pub adapted_len: i64,
    /// Elements of the trainable prefix (padding included).
    pub trainable_len: i64,
}

impl Group {
    /// The kind of the group's variables.
    pub fn kind(&self) -> Kind {
        self.buffer.kind()
    }

    /// The device of the group's variables.
    pub fn device(&self) -> Device {
        self.buffer.device()
    }

    /// Where `entry` starts in a buffer of this group's kind whose first element is at `base`.
    pub fn address(&self, base: usize, entry: &Entry) -> usize {
        base + entry.offset as usize * self.kind().elt_size_in_bytes()
    }

    /// Errors unless `tensor` (the variable of `entry`, or any handle to it) still is its view
    /// of the buffer: something replaced its data after flattening (`VarStore::set_kind`,
    /// `set_data`), so a whole-buffer update would no longer reach it.
    pub fn check_view(&self, part: &'static str, entry: &Entry, tensor: &Tensor) -> Result<()> {
        let want = self.address(self.buffer.data_ptr() as usize, entry);
        if tensor.data_ptr() as usize == want
            && tensor.kind() == self.kind()
            && tensor.size() == entry.shape
            && tensor.stride() == entry.strides
        {
            Ok(())
        } else {
            Err(DdpmError::StateMismatch {
                part,
                reason: format!(
                    "variable {} is no longer a view of the flat weight buffer (its data was \
                     replaced after the optimiser and EMA were built, e.g. by \
                     VarStore::set_kind); build them again after changing the variables",
                    entry.name
                ),
            })
        }
    }
}

/// The variables of a `VarStore` as views of flat buffers, one [`Group`] per kind and device.
#[derive(Debug)]
pub(crate) struct FlatVars {
    pub groups: Vec<Group>,
}

/// Elements per alignment step for `kind`.
fn align_elems(kind: Kind) -> i64 {
    (ALIGN_BYTES / kind.elt_size_in_bytes() as i64).max(1)
}

impl FlatVars {
    /// Makes every variable of `vs` a view of its group's buffer (reusing the buffer when they
    /// already are views laid out this way).
    pub fn of(vs: &VarStore) -> Result<FlatVars> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        // Groups in order of their first variable's name, so the layout is deterministic.
        let mut keys: Vec<(Kind, Device)> = Vec::new();
        for (_, v) in &vars {
            let key = (v.kind(), v.device());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let mut groups = Vec::with_capacity(keys.len());
        for key in keys {
            let mut members: Vec<(String, Tensor)> = vars
                .iter()
                .filter(|(_, v)| (v.kind(), v.device()) == key)
                .map(|(n, v)| (n.clone(), v.shallow_clone()))
                .collect();
            let rank =
                |n: &str, v: &Tensor| match (v.requires_grad(), crate::lamb::is_adapted(n, v)) {
                    (true, true) => 0,
                    (true, false) => 1,
                    (false, _) => 2,
                };
            members.sort_by(|a, b| (rank(&a.0, &a.1), &a.0).cmp(&(rank(&b.0, &b.1), &b.0)));
            groups.push(Group::build(members, key)?);
        }
        Ok(FlatVars { groups })
    }
}

impl Group {
    fn build(members: Vec<(String, Tensor)>, (kind, device): (Kind, Device)) -> Result<Group> {
        let align = align_elems(kind);
        let mut entries = Vec::with_capacity(members.len());
        let mut offset = 0i64;
        let (mut adapted_len, mut trainable_len) = (0i64, 0i64);
        for (name, var) in members {
            let numel = var.numel() as i64;
            let padded = (numel + align - 1) / align * align;
            let trainable = var.requires_grad();
            let adapt = trainable && crate::lamb::is_adapted(&name, &var);
            let shape = var.size();
            let strides = dense_strides(&shape, &var.stride());
            entries.push(Entry {
                name,
                var,
                offset,
                numel,
                padded,
                shape,
                strides,
                trainable,
                adapt,
            });
            offset += padded;
            if adapt {
                adapted_len = offset;
            }
            if trainable {
                trainable_len = offset;
            }
        }
        let total = offset;
        if let Some(buffer) = Self::existing(&entries, total)? {
            return Ok(Group {
                buffer,
                entries,
                adapted_len,
                trainable_len,
            });
        }
        let buffer = Tensor::f_zeros([total], (kind, device))?;
        tch::no_grad(|| -> Result<()> {
            for e in entries.iter_mut() {
                let mut place = e.view_of(&buffer)?;
                place.f_copy_(&e.var)?;
                e.var.f_set_data(&place)?;
            }
            Ok(())
        })?;
        Ok(Group {
            buffer,
            entries,
            adapted_len,
            trainable_len,
        })
    }

    /// The buffer the entries already are views of, if they are (laid out as `entries` say).
    fn existing(entries: &[Entry], total: i64) -> Result<Option<Tensor>> {
        let Some(first) = entries.first() else {
            return Ok(None);
        };
        if !first.var.is_contiguous() {
            return Ok(None);
        }
        // A 1-D view from the first variable's first element over `total` elements; libtorch
        // refuses it when the first variable's storage is smaller, i.e. when it is not a view
        // of a flat buffer at all.
        let Ok(candidate) = first.var.f_detach()?.f_as_strided([total], [1], None) else {
            return Ok(None);
        };
        for e in entries {
            if !e.var.f_is_set_to(&e.view_of(&candidate)?)? {
                return Ok(None);
            }
        }
        Ok(Some(candidate))
    }
}

/// `strides` if they lay the elements of `shape` out densely without overlap (some order of
/// the dimensions, each stride the product of the sizes inside it), else the contiguous ones.
fn dense_strides(shape: &[i64], strides: &[i64]) -> Vec<i64> {
    let contiguous = {
        let mut out = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            out[i] = out[i + 1] * shape[i + 1].max(1);
        }
        out
    };
    if strides.len() != shape.len() || shape.contains(&0) {
        return contiguous;
    }
    let mut order: Vec<usize> = (0..shape.len()).filter(|&i| shape[i] != 1).collect();
    order.sort_by_key(|&i| strides[i]);
    let mut expected = 1i64;
    for i in order {
        if strides[i] != expected {
            return contiguous;
        }
        expected *= shape[i];
    }
    // Dimensions of size 1 get the contiguous stride (any is valid; this keeps them canonical).
    shape
        .iter()
        .zip(strides)
        .zip(&contiguous)
        .map(|((&n, &s), &c)| if n == 1 { c } else { s })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    #[test]
    fn variables_become_views_of_one_aligned_buffer_and_keep_their_values() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let lin = nn::linear(&root / "lin", 3, 5, Default::default());
        let _ = nn::group_norm(&root / "norm1", 1, 5, Default::default());
        let before: Vec<(String, Vec<f32>)> = {
            let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.iter()
                .map(|(n, t)| (n.clone(), Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
                .collect()
        };
        let flat = FlatVars::of(&vs).unwrap();
        assert_eq!(flat.groups.len(), 1);
        let g = &flat.groups[0];
        let names: Vec<&str> = g.entries.iter().map(|e| e.name.as_str()).collect();
        // Adapted first, then the excluded ones, each sorted.
        assert_eq!(
            names,
            vec!["lin.weight", "lin.bias", "norm1.bias", "norm1.weight"]
        );
        assert_eq!(g.adapted_len, 64);
        assert_eq!(g.trainable_len, 4 * 64);
        for (name, values) in before {
            let now = Vec::<f32>::try_from(vs.variables()[&name].flatten(0, -1)).unwrap();
            assert_eq!(now, values, "{name} changed when flattened");
        }
        let base = g.buffer.data_ptr() as usize;
        for e in &g.entries {
            assert_eq!(e.offset % 64, 0);
            g.check_view("test", e, &vs.variables()[&e.name]).unwrap();
            assert_eq!(
                vs.variables()[&e.name].data_ptr() as usize,
                g.address(base, e)
            );
        }
        // The network's own handle writes through to the buffer, and the buffer to it.
        tch::no_grad(|| {
            let _ = lin.ws.shallow_clone().fill_(2.0);
        });
        assert_eq!(g.buffer.double_value(&[14]), 2.0);
        assert_eq!(g.buffer.double_value(&[15]), 0.0, "padding is zero");
        let _ = g.buffer.narrow(0, 64, 5).fill_(-1.0);
        assert_eq!(
            Vec::<f32>::try_from(vs.variables()["lin.bias"].shallow_clone()).unwrap(),
            vec![-1.0; 5]
        );
        // A second caller reuses the buffer.
        let again = FlatVars::of(&vs).unwrap();
        assert_eq!(again.groups[0].buffer.data_ptr(), g.buffer.data_ptr());
        // Replacing a variable's data is detected.
        vs.variables()["lin.weight"]
            .shallow_clone()
            .set_data(&Tensor::zeros([5, 3], (Kind::Float, Device::Cpu)));
        let e = &g.entries[0];
        assert!(g.check_view("test", e, &vs.variables()[&e.name]).is_err());
    }

    /// A channels-last weight keeps its layout (and values) as a view of the buffer.
    #[test]
    fn a_channels_last_weight_stays_channels_last() {
        let vs = VarStore::new(Device::Cpu);
        let conv = nn::conv2d(vs.root() / "conv", 3, 4, 3, Default::default());
        let mut w = conv.ws.shallow_clone();
        let cl = w
            .contiguous()
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]);
        w.set_data(&cl);
        let strides = w.stride();
        assert_eq!(strides, vec![27, 1, 9, 3]);
        let before = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        let flat = FlatVars::of(&vs).unwrap();
        assert_eq!(conv.ws.stride(), strides);
        assert_eq!(
            Vec::<f32>::try_from(conv.ws.flatten(0, -1)).unwrap(),
            before
        );
        let g = &flat.groups[0];
        g.check_view("test", &g.entries[0], &conv.ws).unwrap();
        assert_eq!(
            dense_strides(&[2, 3], &[1, 1]),
            vec![3, 1],
            "overlapping: contiguous"
        );
    }
}
