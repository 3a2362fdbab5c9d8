//! What users write, parsed and validated, with no model in sight: the lanes config
//! ([`lanes`]), the values of the traffic-shaping settings in it and in Service annotations
//! ([`values`]), and Kubernetes' label syntax with the lane label keys ([`labels`]). The model
//! turns them into desired state.

pub mod labels;
pub mod lanes;
pub mod values;
