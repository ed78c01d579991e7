pub mod secagg;
