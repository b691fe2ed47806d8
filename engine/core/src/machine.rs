//! The compiled machine: states and transitions by index, candidates looked up by
//! trigger then state, guards parsed and regexes compiled once.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use onex_contract::condition::{Expression, Operator};
use onex_contract::model::{FsmContract, StateRef};
use serde_json::Value;

pub type StateId = usize;
pub type TransitionId = usize;
/// Index into [`Machine::actions`]; intents carry it instead of the name.
pub type ActionId = u32;

#[derive(Debug)]
pub struct State {
    pub name: Arc<str>,
    pub terminal: bool,
    pub entry_actions: Vec<ActionId>,
    pub exit_actions: Vec<ActionId>,
}

#[derive(Debug)]
pub struct Action {
    pub name: Arc<str>,
    /// `action_config` of dialect B, shared by every intent of this action.
    pub config: Option<Arc<Value>>,
}

#[derive(Debug)]
pub struct Guard {
    pub text: Arc<str>,
    pub expression: Expression,
    /// Compiled once for `matches`, anchored at the start.
    pub regex: Option<regex::Regex>,
}

#[derive(Debug)]
pub struct Transition {
    /// The declared name, else `from->to@trigger`.
    pub name: Arc<str>,
    pub from: Option<StateId>,
    pub to: StateId,
    pub trigger: Arc<str>,
    pub priority: i64,
    /// Required guards only: `required: false` conditions are never evaluated.
    pub guards: Vec<Guard>,
    pub actions: Vec<ActionId>,
}

/// Candidate transitions of one trigger: per source state, and wildcard ones; each
/// list is already in selection order (priority, highest first, then declaration).
#[derive(Debug, Default)]
struct TriggerTable {
    by_state: Vec<Vec<TransitionId>>,
    wildcard: Vec<TransitionId>,
}

/// FNV-1a: triggers are short strings looked up once per event, where std's SipHash
/// (built against hash flooding, which a contract's own trigger table cannot suffer)
/// costs more than the rest of the lookup.
#[derive(Debug, Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

#[derive(Debug)]
pub struct Machine {
    pub name: Arc<str>,
    /// A stable fingerprint of the machine's structure; part of idempotency keys.
    pub fingerprint: u64,
    pub states: Vec<State>,
    pub transitions: Vec<Transition>,
    /// Every action occurrence (state entry/exit and transition), in declaration order.
    pub actions: Vec<Action>,
    pub initial: StateId,
    /// Declared context variable types (dialect A), by name.
    pub context_types: HashMap<String, String>,
    triggers: HashMap<Arc<str>, TriggerTable, FnvBuild>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError(pub String);

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CompileError {}

impl Machine {
    /// Compiles a contract that loaded without errors. A contract with errors cannot
    /// be compiled; the error names the first reason.
    pub fn compile(fsm: &FsmContract) -> Result<Machine, CompileError> {
        let mut actions: Vec<Action> = Vec::new();
        let mut intern = |list: &[onex_contract::model::Action]| -> Vec<ActionId> {
            list.iter()
                .map(|a| {
                    actions.push(action(a));
                    ActionId::try_from(actions.len() - 1).unwrap_or(ActionId::MAX)
                })
                .collect()
        };
        let mut index: HashMap<&str, StateId> = HashMap::new();
        let states: Vec<State> = fsm
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                index.entry(&s.name.value).or_insert(i);
                State {
                    name: s.name.value.as_str().into(),
                    terminal: s.is_terminal,
                    entry_actions: intern(&s.entry_actions),
                    exit_actions: intern(&s.exit_actions),
                }
            })
            .collect();
        let lookup = |name: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| CompileError(format!("unknown state `{name}`")))
        };
        let initial = lookup(
            &fsm.initial_state
                .as_ref()
                .ok_or_else(|| CompileError("no initial state".into()))?
                .value,
        )?;
        let mut transitions = Vec::with_capacity(fsm.transitions.len());
        for t in &fsm.transitions {
            let from = match &t.from.value {
                StateRef::Any => None,
                StateRef::Named(name) => Some(lookup(name)?),
            };
            let guards = t
                .conditions
                .iter()
                .filter(|c| c.required)
                .map(|c| {
                    let expression = c.parsed.clone().map_err(|e| {
                        CompileError(format!("condition `{}`: {e}", c.expression.value))
                    })?;
                    let regex = match (expression.operator, &expression.value) {
                        (Operator::Matches, value) => {
                            let pattern = value
                                .as_str()
                                .map_or_else(|| value.to_string(), str::to_owned);
                            Some(
                                regex::Regex::new(&format!("^(?:{pattern})"))
                                    .map_err(|e| CompileError(e.to_string()))?,
                            )
                        }
                        _ => None,
                    };
                    Ok(Guard {
                        text: c.expression.value.as_str().into(),
                        expression,
                        regex,
                    })
                })
                .collect::<Result<Vec<_>, CompileError>>()?;
            let name = match &t.name {
                Some(n) => n.value.clone(),
                None => format!(
                    "{}->{}@{}",
                    from.map_or("*", |f| &fsm.states[f].name.value),
                    t.to.value,
                    t.trigger.value
                ),
            };
            transitions.push(Transition {
                name: name.into(),
                from,
                to: lookup(&t.to.value)?,
                trigger: t.trigger.value.as_str().into(),
                priority: t.priority,
                guards,
                actions: intern(&t.actions),
            });
        }
        let mut triggers: HashMap<Arc<str>, TriggerTable, FnvBuild> = HashMap::default();
        for (id, t) in transitions.iter().enumerate() {
            let table = triggers.entry(t.trigger.clone()).or_default();
            match t.from {
                Some(from) => {
                    if table.by_state.len() < states.len() {
                        table.by_state.resize_with(states.len(), Vec::new);
                    }
                    table.by_state[from].push(id);
                }
                None => table.wildcard.push(id),
            }
        }
        for table in triggers.values_mut() {
            // Stable sort: equal priorities keep declaration order.
            for list in table
                .by_state
                .iter_mut()
                .chain(std::iter::once(&mut table.wildcard))
            {
                list.sort_by_key(|&id| std::cmp::Reverse(transitions[id].priority));
            }
        }
        let name: Arc<str> = fsm
            .machine_name
            .as_deref()
            .or(fsm.name.as_deref())
            .unwrap_or("fsm")
            .into();
        let fingerprint = fingerprint(&name, &states, &transitions, &actions);
        let context_types = fsm
            .context_variables
            .iter()
            .filter_map(|v| Some((v.name.value.clone(), v.declared_type.clone()?)))
            .collect();
        Ok(Machine {
            name,
            fingerprint,
            states,
            transitions,
            actions,
            initial,
            context_types,
            triggers,
        })
    }

    /// Candidates for `trigger` in `state`: exact ones, or only when there are none,
    /// wildcard ones (shared note §3).
    pub fn candidates(&self, state: StateId, trigger: &str) -> &[TransitionId] {
        let Some(table) = self.triggers.get(trigger) else {
            return &[];
        };
        match table.by_state.get(state) {
            Some(exact) if !exact.is_empty() => exact,
            _ => &table.wildcard,
        }
    }

    pub fn action(&self, id: ActionId) -> &Action {
        &self.actions[id as usize]
    }

    /// The machine's shared name for a trigger; an undeclared trigger gets its own.
    pub fn trigger_name(&self, trigger: &str) -> Arc<str> {
        match self.triggers.get_key_value(trigger) {
            Some((name, _)) => name.clone(),
            None => trigger.into(),
        }
    }

    pub fn state_id(&self, name: &str) -> Option<StateId> {
        self.states.iter().position(|s| &*s.name == name)
    }

    /// Every trigger the machine declares, in first-declared order.
    pub fn triggers(&self) -> Vec<Arc<str>> {
        let mut seen: Vec<Arc<str>> = Vec::new();
        for t in &self.transitions {
            if !seen.contains(&t.trigger) {
                seen.push(t.trigger.clone());
            }
        }
        seen
    }
}

fn action(a: &onex_contract::model::Action) -> Action {
    let config = (!a.config.is_null()).then(|| Arc::new(a.config.clone()));
    Action {
        name: a.name.value.as_str().into(),
        config,
    }
}

/// FNV-1a over the names that identify the machine's behaviour.
fn fingerprint(
    name: &str,
    states: &[State],
    transitions: &[Transition],
    actions: &[Action],
) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |text: &str| {
        for byte in text.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(name);
    for s in states {
        feed(&s.name);
    }
    for t in transitions {
        feed(&t.name);
        feed(&t.trigger);
        for g in &t.guards {
            feed(&g.text);
        }
        for &a in &t.actions {
            feed(&actions[a as usize].name);
        }
    }
    hash
}
