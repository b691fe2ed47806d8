//! The happy-path cycle of the dual-registration FSM (6 transitions, 25 actions,
//! intents materialised) through `step_in_place`, and the memory of idle instances.
//! Run with `cargo bench -p onex-core`. Targets: >= 5,000,000 transitions/s on one
//! core; <= 1 KiB per idle instance beyond its context.

// A counting allocator needs `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use onex_contract::{Contract, load};
use onex_core::{Change, Event, Instance, Machine, StepRecord, step_in_place};
use serde_json::{Map, Value, json};

/// Counts heap bytes allocated while `COUNTING` is on, to measure what an instance
/// costs; off, it adds one relaxed load per allocation.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CONTRACT: &str = include_str!("../../../contracts/fsm/dual_registration_reducer_fsm.yaml");

fn machine() -> Machine {
    let Some(Contract::Fsm(fsm)) = load(CONTRACT).contract else {
        panic!("the contract loads")
    };
    Machine::compile(&fsm).expect("compiles")
}

fn map(value: Value) -> Map<String, Value> {
    value.as_object().cloned().expect("object")
}

fn happy_path(c: &mut Criterion) {
    let machine = machine();
    let introspection = Arc::new(map(
        json!({"node_id": "3f2c8a4e-1b7d-4c9a-9e0f-5a6b7c8d9e01", "node_type": "effect"}),
    ));
    let results = Arc::new(map(
        json!({"consul_registered": true, "postgres_registered": true, "success_count": 2}),
    ));
    let correlation: Arc<str> = "c0ffee00-0000-4000-8000-000000000001".into();
    let events = [
        ("introspection_event_received", Some(&introspection)),
        ("event_parsed", None),
        ("validation_passed", None),
        ("registration_attempts_complete", None),
        ("all_backends_succeeded", Some(&results)),
        ("result_emitted", None),
    ];
    let mut instance = Instance::new(&machine, "node-1");
    let mut record = StepRecord::default();
    let mut actions = 0;
    for (trigger, context) in events {
        step_in_place(
            &machine,
            &mut instance,
            Event {
                trigger,
                context: context.map(Change::Lent),
                correlation_id: Some(&correlation),
                message_id: None,
            },
            &mut record,
        );
        assert!(record.rejection.is_none(), "{trigger} is accepted");
        actions += record.intents.len();
    }
    assert_eq!((instance.state, actions), (machine.initial, 25));

    let mut group = c.benchmark_group("dual_registration");
    group.throughput(Throughput::Elements(6));
    group.bench_function("happy-path cycle (6 transitions, 25 intents)", |b| {
        b.iter(|| {
            for (trigger, context) in events {
                let event = Event {
                    trigger,
                    context: context.map(Change::Lent),
                    correlation_id: Some(&correlation),
                    message_id: None,
                };
                step_in_place(&machine, &mut instance, event, &mut record);
            }
            record.intents.len()
        })
    });
    group.finish();
}

fn idle_instance_memory(_: &mut Criterion) {
    let machine = machine();
    let count = 100_000;
    let keys: Vec<String> = (0..count)
        .map(|i| format!("3f2c8a4e-1b7d-4c9a-9e0f-{i:012}"))
        .collect();
    let mut instances: Vec<Instance> = Vec::with_capacity(count);
    COUNTING.store(true, Ordering::Relaxed);
    instances.extend(keys.iter().map(|k| Instance::new(&machine, k.as_str())));
    COUNTING.store(false, Ordering::Relaxed);
    let slots = count * std::mem::size_of::<Instance>();
    let per_instance = (ALLOCATED.load(Ordering::Relaxed) + slots) as f64 / count as f64;
    println!(
        "idle instance: {per_instance:.0} bytes each (struct, 36-byte key, history buffer, empty context)"
    );
    assert!(
        per_instance <= 1024.0,
        "{per_instance} bytes per idle instance"
    );
    drop(instances);
}

criterion_group!(benches, happy_path, idle_instance_memory);
criterion_main!(benches);
