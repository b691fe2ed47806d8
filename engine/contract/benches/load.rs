//! Parse + schema + lint of the dual-registration contract (target: at most 1 ms), and
//! each stage on its own. Run with `cargo bench -p onex-contract`.

use criterion::{Criterion, criterion_group, criterion_main};
use onex_contract::{ContractKind, load, schema, yaml};

const DUAL_REGISTRATION: &str =
    include_str!("../../../contracts/fsm/dual_registration_reducer_fsm.yaml");

fn stages(c: &mut Criterion) {
    assert!(
        !load(DUAL_REGISTRATION).has_errors(),
        "the benchmarked contract is clean"
    );
    c.bench_function("load dual_registration (parse + schema + lint)", |b| {
        b.iter(|| load(std::hint::black_box(DUAL_REGISTRATION)))
    });
    c.bench_function("parse dual_registration", |b| {
        b.iter(|| yaml::parse(std::hint::black_box(DUAL_REGISTRATION)))
    });
    let root = yaml::parse(DUAL_REGISTRATION).root.expect("parses");
    let document = root.to_json();
    c.bench_function("schema dual_registration", |b| {
        b.iter(|| schema::validate(ContractKind::Fsm, &root, std::hint::black_box(&document)))
    });
}

criterion_group!(benches, stages);
criterion_main!(benches);
