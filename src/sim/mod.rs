pub mod ssqpm;
pub mod fluo;
