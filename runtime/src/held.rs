//! `Held`: how a value holds something it uses but did not make. Rust callers lend it and
//! keep it alive around the user; the C API's handles own what they use, so there it is
//! shared (a model shares its runtime's backend, a trainer or client shares its model).

/// Borrowed for `'a`, or shared through an `Arc`.
#[derive(Debug)]
pub enum Held<'a, T> {
    Borrowed(&'a T),
    #[cfg(feature = "std")]
    Shared(std::sync::Arc<T>),
}

impl<T> core::ops::Deref for Held<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            #[cfg(feature = "std")]
            Held::Shared(t) => t,
        }
    }
}

impl<'a, T> From<&'a T> for Held<'a, T> {
    fn from(t: &'a T) -> Self {
        Held::Borrowed(t)
    }
}

#[cfg(feature = "std")]
impl<T> From<std::sync::Arc<T>> for Held<'static, T> {
    fn from(t: std::sync::Arc<T>) -> Self {
        Held::Shared(t)
    }
}
