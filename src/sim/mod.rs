pub mod ssqpm;
pub mod fluo;
pub mod qpi;
