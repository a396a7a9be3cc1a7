//! The hub: which connections belong to which user. Owned by the event loop thread
//! (no locks); a user's entry exists exactly while the user has an open connection.

use std::collections::HashMap;
use std::rc::Rc;

/// Slab keys of one user's open connections (several tabs and devices).
pub type ConnectionKeys = Vec<usize>;

/// `user_id` -> that user's open connections.
#[derive(Default)]
pub struct Hub {
    users: HashMap<Rc<str>, ConnectionKeys>,
    connections: usize,
}

impl Hub {
    /// A hub sized for `users` users without rehashing.
    pub fn with_capacity(users: usize) -> Hub {
        Hub {
            users: HashMap::with_capacity(users),
            connections: 0,
        }
    }

    /// Adds a connection; returns the user id shared with the hub's key (one
    /// allocation per user, however many connections it has).
    pub fn add(&mut self, user_id: &str, key: usize) -> Rc<str> {
        self.connections += 1;
        if let Some((shared, _)) = self.users.get_key_value(user_id) {
            let shared = Rc::clone(shared);
            if let Some(keys) = self.users.get_mut(user_id) {
                keys.push(key);
            }
            return shared;
        }
        let shared: Rc<str> = Rc::from(user_id);
        self.users.insert(Rc::clone(&shared), vec![key]);
        shared
    }

    /// Removes a connection; the user's entry goes with its last connection.
    /// True when that was the user's last connection.
    pub fn remove(&mut self, user_id: &str, key: usize) -> bool {
        let Some(keys) = self.users.get_mut(user_id) else {
            return false;
        };
        let Some(position) = keys.iter().position(|&k| k == key) else {
            return false;
        };
        keys.swap_remove(position);
        self.connections -= 1;
        if keys.is_empty() {
            self.users.remove(user_id);
            return true;
        }
        false
    }

    /// The user's connections, if any.
    pub fn connections_of(&self, user_id: &str) -> Option<&[usize]> {
        self.users.get(user_id).map(Vec::as_slice)
    }

    /// Open connections across all users.
    pub fn connection_count(&self) -> usize {
        self.connections
    }

    /// Users with at least one open connection.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_lives_as_long_as_its_connections() {
        let mut hub = Hub::default();
        let a = hub.add("alice", 1);
        let b = hub.add("alice", 2);
        assert!(Rc::ptr_eq(&a, &b));
        hub.add("org:42:bob", 3);
        assert_eq!(hub.connection_count(), 3);
        assert_eq!(hub.user_count(), 2);
        assert_eq!(hub.connections_of("alice"), Some(&[1, 2][..]));
        assert!(!hub.remove("alice", 1));
        assert_eq!(hub.connections_of("alice"), Some(&[2][..]));
        assert!(hub.remove("alice", 2), "the last one");
        assert_eq!(hub.connections_of("alice"), None);
        assert_eq!(hub.user_count(), 1);
        // Removing twice is harmless.
        assert!(!hub.remove("alice", 2));
        assert_eq!(hub.connection_count(), 1);
    }
}
