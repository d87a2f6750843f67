//! Many FIFO queues in one slab: a shard's mailboxes. A mailbox is three integers (head, tail,
//! length); its messages live in slots of a slab shared by every mailbox of the shard, linked
//! in order, and a slot freed by a pop is reused by the next push. So an empty mailbox costs
//! no allocation, and the steady state (a message in, a message out) allocates nothing: the
//! slab grows to the most messages ever waiting on the shard at once, not to the sum of every
//! mailbox's peak (a `VecDeque` per mailbox keeps the capacity of its largest burst for ever:
//! measured, about 2 KiB more per session in `bench/compare.sh chat`).

const NONE: u32 = u32::MAX;

/// One queue's ends and length; its messages are in a [`Slab`].
#[derive(Debug)]
pub struct Queue {
    head: u32,
    tail: u32,
    len: u32,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            head: NONE,
            tail: NONE,
            len: 0,
        }
    }
}

impl Queue {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

enum Slot<T> {
    Full { value: T, next: u32 },
    Free { next: u32 },
}

/// The slots of many queues.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: u32,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: NONE,
        }
    }
}

impl<T> Slab<T> {
    fn take_slot(&mut self, value: T, next: u32) -> u32 {
        if self.free == NONE {
            self.slots.push(Slot::Full { value, next });
            return (self.slots.len() - 1) as u32;
        }
        let i = self.free;
        // The free list links free slots only.
        self.free = match self.slots[i as usize] {
            Slot::Free { next } => next,
            Slot::Full { .. } => NONE,
        };
        self.slots[i as usize] = Slot::Full { value, next };
        i
    }

    /// Frees slot `i` (the head of a queue, so full) and gives back its value and successor.
    fn release(&mut self, i: u32) -> Option<(T, u32)> {
        let Slot::Full { .. } = self.slots.get(i as usize)? else {
            return None;
        };
        let slot = std::mem::replace(&mut self.slots[i as usize], Slot::Free { next: self.free });
        self.free = i;
        match slot {
            Slot::Full { value, next } => Some((value, next)),
            Slot::Free { .. } => None,
        }
    }

    pub fn push_back(&mut self, q: &mut Queue, value: T) {
        let i = self.take_slot(value, NONE);
        if q.tail == NONE {
            q.head = i;
        } else if let Slot::Full { next, .. } = &mut self.slots[q.tail as usize] {
            *next = i;
        }
        q.tail = i;
        q.len += 1;
    }

    pub fn push_front(&mut self, q: &mut Queue, value: T) {
        let i = self.take_slot(value, q.head);
        q.head = i;
        if q.tail == NONE {
            q.tail = i;
        }
        q.len += 1;
    }

    pub fn pop_front(&mut self, q: &mut Queue) -> Option<T> {
        if q.head == NONE {
            return None;
        }
        let (value, next) = self.release(q.head)?;
        q.head = next;
        if next == NONE {
            q.tail = NONE;
        }
        q.len -= 1;
        Some(value)
    }

    pub fn front(&self, q: &Queue) -> Option<&T> {
        match self.slots.get(q.head as usize)? {
            Slot::Full { value, .. } => Some(value),
            Slot::Free { .. } => None,
        }
    }

    /// Empties `q`, in order.
    pub fn drain(&mut self, mut q: Queue) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || self.pop_front(&mut q))
    }

    pub fn iter<'a>(&'a self, q: &Queue) -> impl Iterator<Item = &'a T> + 'a {
        let mut at = q.head;
        std::iter::from_fn(move || {
            let Slot::Full { value, next } = self.slots.get(at as usize)? else {
                return None;
            };
            at = *next;
            Some(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Op {
        Back(usize, u32),
        Front(usize, u32),
        Pop(usize),
        Drain(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, any::<u32>()).prop_map(|(q, v)| Op::Back(q, v)),
            1 => (0..4usize, any::<u32>()).prop_map(|(q, v)| Op::Front(q, v)),
            4 => (0..4usize).prop_map(Op::Pop),
            1 => (0..4usize).prop_map(Op::Drain),
        ]
    }

    proptest! {
        /// Four queues in one slab behave as four `VecDeque`s, and the slab never holds more
        /// slots than the most messages waiting at once.
        #[test]
        fn behaves_as_separate_deques(ops in proptest::collection::vec(op(), 0..300)) {
            let mut slab = Slab::default();
            let mut qs: Vec<Queue> = (0..4).map(|_| Queue::default()).collect();
            let mut model: Vec<VecDeque<u32>> = vec![VecDeque::new(); 4];
            let mut peak = 0;
            for o in ops {
                match o {
                    Op::Back(q, v) => { slab.push_back(&mut qs[q], v); model[q].push_back(v); }
                    Op::Front(q, v) => { slab.push_front(&mut qs[q], v); model[q].push_front(v); }
                    Op::Pop(q) => prop_assert_eq!(slab.pop_front(&mut qs[q]), model[q].pop_front()),
                    Op::Drain(q) => {
                        let got: Vec<u32> = slab.drain(std::mem::take(&mut qs[q])).collect();
                        let want: Vec<u32> = model[q].drain(..).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                let waiting: usize = model.iter().map(VecDeque::len).sum();
                peak = peak.max(waiting);
                prop_assert!(slab.slots.len() <= peak);
                for (q, m) in qs.iter().zip(&model) {
                    prop_assert_eq!(q.len(), m.len());
                    prop_assert_eq!(slab.front(q), m.front());
                    prop_assert!(slab.iter(q).eq(m.iter()));
                }
            }
        }
    }
}
