//! The model kinds this engine knows, each implemented in its method's folder.

use crate::engine::method::Method;
use crate::engine::model::ModelKind;

/// The implementation of `kind`.
pub fn method(kind: ModelKind) -> &'static dyn Method {
    match kind {
        ModelKind::Unet => &crate::nnunet::NNUNET,
        ModelKind::Dmqpm => &crate::dmqpm::DMQPM,
        ModelKind::Musplit => &crate::musplit::MUSPLIT,
        ModelKind::Pgdiff => &crate::pgdiff::PGDIFF,
    }
}

/// Every kind, in the order hosts list their recipes.
pub const KINDS: [ModelKind; 4] = [ModelKind::Dmqpm, ModelKind::Unet, ModelKind::Pgdiff, ModelKind::Musplit];
