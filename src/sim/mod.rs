pub mod ssqpm;
