//! Redaction: every value the gateway resolved or stored, removed from everything it emits.
//!
//! A [`Redactor`] holds the set of secret values. Each value is registered together with its
//! encoded forms ([`add`](Redactor::add) lists them), and every occurrence of any form is replaced
//! by [`REPLACEMENT`]. Matching is done by multi-pattern automata (aho-corasick, leftmost-longest)
//! built lazily on the first use after a value was added and shared behind an [`Arc`]: concurrent
//! readers take them under a read lock and search without holding any lock, so they never wait
//! for each other (only for the one build that follows an `add`).
//!
//! The automata are tiers, as in a log-structured merge: the values added since the last build
//! get a tier of their own, and tiers are merged so that each is more than twice the size of the
//! next (about log2(N) of them for N values, a few more while a merge is under way), each form
//! being rebuilt only when its tier grows by half, about log(N) times in all. A merge of up to
//! [`MERGE_IN_LINE`] forms is built in line by the redaction that needs it; a larger one on a
//! background thread, while the tiers it merges go on serving. A gateway that resolves one new
//! value at a time therefore pays for that value's forms and at most a 4,096-form merge, never for
//! rebuilding every value it holds (which took 0.2-0.5 ms per value held). A search runs every
//! tier, and the occurrences they find are merged.
//!
//! What is redacted is the union of all occurrences: the longest occurrence at each start position
//! is taken, and overlapping or touching occurrences (of one value or of several) are covered
//! entirely and become a single [`REPLACEMENT`], so no secret byte escapes even when two values
//! overlap in the text.
//!
//! [`StreamRedactor`] applies the same rule to a stream cut into arbitrary writes. It holds back
//! only the shortest suffix of what it has seen that could still be the start of an occurrence
//! (a suffix that is a proper prefix of some pattern), and releases it as soon as it can no longer
//! be one. It therefore never holds back more than the longest pattern's length minus one bytes,
//! and for a fixed set of values its output equals the one-shot [`Redactor::redact`] of the whole
//! stream. [`RedactingWriter`] wraps it as a tokio [`AsyncWrite`].
//!
//! Values shorter than [`MIN_REDACT_LEN`] bytes are refused: redacting every occurrence of two or
//! three bytes would destroy the output, so [`Redactor::add`] returns `false` and the caller warns.
//!
//! Secret material held here (values, patterns, the prefix index, held-back stream bytes) lives in
//! zeroizing buffers and is wiped on drop. The aho-corasick automaton keeps its own copies of the
//! patterns (transition tables, prefilters) that cannot be zeroized; they are freed, not wiped,
//! when the automaton is rebuilt or the last [`Redactor`] clone is dropped.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll, ready};

use aho_corasick::{AhoCorasick, AhoCorasickKind, Input, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::engine::{Config, GeneralPurpose};
use tokio::io::AsyncWrite;
use zeroize::{Zeroize, Zeroizing};

/// Values shorter than this many bytes are not registered: redacting them would destroy output.
pub const MIN_REDACT_LEN: usize = 4;

/// What every redacted run of bytes is replaced with (ASCII, so it keeps text valid UTF-8).
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// The most bytes of a form the automaton matches. A longer form is matched by its first
/// `MAX_HEAD` bytes, its head, and an occurrence of the head covers as many bytes as the whole form
/// has (or up to the end of the text), whatever they are. That bounds the automaton, the prefix
/// index and the bytes a stream holds back by this length rather than by the longest value: a
/// 32 KiB value's full forms took 70 s and a 1 MiB value's 1.8 GB to build. It redacts a long
/// value printed only in part, as long as its head is there, and fails closed on text that shares
/// the head and then differs (128 bytes of a value's encoding do not appear by chance). Forms that
/// share a head cover the longest one's length: an occurrence of a shorter one (base64 without its
/// padding, a raw value whose JSON escape is longer) also covers the few bytes after it.
pub const MAX_HEAD: usize = 128;

/// The shortest base64 fragment registered for a value embedded at an unaligned offset.
///
/// Eight base64 characters carry 48 bits of the value, which keeps false positives negligible.
const MIN_BASE64_CORE_LEN: usize = 8;

/// A buffer that holds secret bytes and is wiped when dropped.
type Secret = Zeroizing<Vec<u8>>;

/// A form of a value, as the automaton matches it: its head, and how many bytes it covers.
struct Pattern {
    /// The form's first [`MAX_HEAD`] bytes (all of it, if shorter).
    head: Secret,
    /// The whole form's length: what an occurrence of the head covers.
    len: usize,
}

impl Pattern {
    /// `form` cut to its head; the cut-off bytes are wiped.
    fn of(mut form: Secret) -> Pattern {
        let len = form.len();
        if len > MAX_HEAD {
            form[MAX_HEAD..].zeroize();
            form.truncate(MAX_HEAD);
        }
        Pattern { head: form, len }
    }
}

/// The set of secret values to redact, shared by all its clones.
///
/// Cloning is cheap and every clone sees the same values: a value added through one clone is
/// redacted by all of them, including [`StreamRedactor`]s created earlier.
#[derive(Clone, Default)]
pub struct Redactor {
    shared: Arc<RwLock<Shared>>,
}

/// The state behind a [`Redactor`]'s lock.
#[derive(Default)]
struct Shared {
    /// The registered values, raw (deduplicated).
    values: Vec<Secret>,
    /// The forms of the values added since the last build (deduplicated per value), as their
    /// heads (at most [`MAX_HEAD`] bytes) and whole lengths; not in any tier yet.
    pending: Vec<Pattern>,
    /// The built tiers, oldest and largest first, each more than twice the size of the next.
    tiers: Vec<Tier>,
    /// The tiers' automata as one snapshot for searching, or `None` while `pending` holds forms.
    matcher: Option<Arc<Matcher>>,
}

/// A merge of at most this many forms is built at once, by the redaction that needs it (about
/// 10 µs a form); a larger one is built on a thread of its own while the tiers it merges go on
/// serving, and replaces them when it is done. So no redaction waits for more than about this
/// many forms' build, however many values are held.
const MERGE_IN_LINE: usize = 4096;

/// One tier: some values' forms, and the automaton built over them.
struct Tier {
    /// The forms, in the parts it was merged from (a merge moves no secret byte).
    parts: Vec<Arc<Vec<Pattern>>>,
    /// How many forms the parts hold.
    len: usize,
    built: Result<Option<Arc<Ready>>, Unredactable>,
    /// Being merged on a background thread: nothing else merges it meanwhile.
    merging: bool,
}

impl Tier {
    fn build(parts: Vec<Arc<Vec<Pattern>>>) -> Tier {
        let len = parts.iter().map(|p| p.len()).sum();
        let built = Ready::build(parts.iter().flat_map(|p| p.iter())).map(|r| r.map(Arc::new));
        Tier {
            parts,
            len,
            built,
            merging: false,
        }
    }

    /// Whether `self` is the tier that `parts` were taken from.
    fn is(&self, parts: &[Arc<Vec<Pattern>>]) -> bool {
        self.parts.len() == parts.len()
            && self.parts.iter().zip(parts).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Shared {
    /// Builds `pending` into a tier and snapshots the tiers. The new tier first absorbs, in line,
    /// every newer tier no more than twice its size while the merge stays within
    /// [`MERGE_IN_LINE`] forms; a larger merge that the tiers call for (each should be more than
    /// twice the size of the next) goes to a background thread.
    fn build(&mut self, this: &Weak<RwLock<Shared>>) -> Arc<Matcher> {
        if !self.pending.is_empty() {
            let mut parts = vec![Arc::new(std::mem::take(&mut self.pending))];
            let mut len = parts[0].len();
            while let Some(newest) = self.tiers.last() {
                if newest.merging
                    || newest.len > len.saturating_mul(2)
                    || newest.len.saturating_add(len) > MERGE_IN_LINE
                {
                    break;
                }
                if let Some(newest) = self.tiers.pop() {
                    len += newest.len;
                    let newer = std::mem::replace(&mut parts, newest.parts);
                    parts.extend(newer);
                }
            }
            self.tiers.push(Tier::build(parts));
            self.merge_in_background(this);
        }
        self.snapshot()
    }

    /// The tiers' automata as one snapshot.
    fn snapshot(&mut self) -> Arc<Matcher> {
        let mut matcher = Matcher {
            tiers: Vec::with_capacity(self.tiers.len()),
            unbuildable: false,
        };
        for tier in &self.tiers {
            match &tier.built {
                Ok(Some(ready)) => matcher.tiers.push(Arc::clone(ready)),
                Ok(None) => {}
                Err(Unredactable) => matcher.unbuildable = true,
            }
        }
        let matcher = Arc::new(matcher);
        self.matcher = Some(Arc::clone(&matcher));
        matcher
    }

    /// Starts merging the newest tiers that the doubling rule says belong together, when no
    /// merge is under way. Until it is done they go on serving as they are.
    fn merge_in_background(&mut self, this: &Weak<RwLock<Shared>>) {
        if self.tiers.iter().any(|t| t.merging) {
            return;
        }
        let Some(newest) = self.tiers.last() else {
            return;
        };
        let mut from = self.tiers.len() - 1;
        let mut len = newest.len;
        while from > 0 && self.tiers[from - 1].len <= len.saturating_mul(2) {
            from -= 1;
            len += self.tiers[from].len;
        }
        if self.tiers.len() - from < 2 {
            return;
        }
        let merged: Vec<Vec<Arc<Vec<Pattern>>>> =
            self.tiers[from..].iter().map(|t| t.parts.clone()).collect();
        for tier in &mut self.tiers[from..] {
            tier.merging = true;
        }
        let spawned = std::thread::Builder::new()
            .name("keyhole-redact-merge".into())
            .spawn({
                let (merged, this) = (merged.clone(), Weak::clone(this));
                move || {
                    let tier = Tier::build(merged.iter().flatten().cloned().collect());
                    // A redactor dropped meanwhile needs nothing more.
                    if let Some(shared) = this.upgrade() {
                        let mut locked = shared.write().unwrap_or_else(PoisonError::into_inner);
                        locked.replace(&merged, tier, &this);
                    }
                }
            });
        if spawned.is_err() {
            // No thread to be had: merge in line, as a small merge would be.
            let tier = Tier::build(merged.iter().flatten().cloned().collect());
            self.replace(&merged, tier, this);
        }
    }

    /// Puts the merged `tier` in place of the tiers whose parts were `merged`, then starts the
    /// next merge the tiers call for, if any.
    fn replace(
        &mut self,
        merged: &[Vec<Arc<Vec<Pattern>>>],
        tier: Tier,
        this: &Weak<RwLock<Shared>>,
    ) {
        let place = merged
            .first()
            .and_then(|first| self.tiers.iter().position(|t| t.is(first)))
            .map(|from| from..from + merged.len())
            .filter(|range| {
                self.tiers
                    .get(range.clone())
                    .is_some_and(|tiers| tiers.iter().zip(merged).all(|(t, parts)| t.is(parts)))
            });
        let Some(place) = place else {
            // Unreachable (only this merge changes tiers marked merging): keep what serves.
            for tier in &mut self.tiers {
                tier.merging = false;
            }
            return;
        };
        self.tiers.splice(place, [tier]);
        // The next search takes a snapshot with the merged tier.
        self.matcher = None;
        self.merge_in_background(this);
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("values", &self.len())
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// An empty redactor: it passes everything through until a value is added.
    pub fn new() -> Redactor {
        Redactor::default()
    }

    /// Registers a value and all its encoded forms; false if it is too short to redact.
    ///
    /// Values shorter than [`MIN_REDACT_LEN`] bytes are not registered (the caller should warn that
    /// they will appear in output). Adding a value already registered returns true and changes
    /// nothing. The forms registered are:
    ///
    /// - the raw bytes;
    /// - base64, standard and URL-safe alphabets, each with and without padding, plus the
    ///   fragments that stay the same wherever the value sits inside a longer base64 text (for
    ///   example `Basic base64(user:password)`), when they are at least 8 characters long;
    /// - hex, lower and upper case;
    /// - percent-encoding, upper and lower case hex digits: RFC 3986 (everything but
    ///   `A-Za-z0-9-._~` escaped), the same with `+` for space, `application/x-www-form-urlencoded`
    ///   (WHATWG: `*-._` kept, `+` for space), JavaScript's `encodeURIComponent` and Python's
    ///   `quote` (`/` kept);
    /// - for UTF-8 values, the JSON string escape (as in structured logs).
    ///
    /// Not covered: other case mixes of hex or percent digits, and base64 broken across lines.
    pub fn add(&self, value: &[u8]) -> bool {
        if value.len() < MIN_REDACT_LEN {
            return false;
        }
        if self.read().values.iter().any(|v| v.as_slice() == value) {
            return true;
        }
        let forms = encoded_forms(value);
        let mut shared = self.write();
        if shared.values.iter().any(|v| v.as_slice() == value) {
            return true;
        }
        shared.values.push(Zeroizing::new(value.to_vec()));
        shared.pending.extend(forms.into_iter().map(Pattern::of));
        shared.matcher = None;
        true
    }

    /// The number of values registered (not counting their encoded forms).
    pub fn len(&self) -> usize {
        self.read().values.len()
    }

    /// True when no value is registered.
    pub fn is_empty(&self) -> bool {
        self.read().values.is_empty()
    }

    /// Redacts every registered value from `input`; borrows it unchanged when nothing matched.
    pub fn redact<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        match self.matcher().redact_runs(input) {
            Ok(runs) if runs.is_empty() => Cow::Borrowed(input),
            Ok(runs) => {
                let mut out = Vec::with_capacity(input.len());
                let mut in_run = false;
                render(input, input.len(), &runs, &mut in_run, &mut out);
                Cow::Owned(out)
            }
            Err(Unredactable) => Cow::Owned(REPLACEMENT.to_vec()),
        }
    }

    /// Redacts every registered value from `input`; borrows it unchanged when nothing matched.
    ///
    /// Text outside the redacted runs is kept byte for byte. A run that starts or ends inside a
    /// multi-byte character (possible with non-UTF-8 values) is widened to whole characters, so
    /// the result is always valid UTF-8.
    pub fn redact_str<'a>(&self, input: &'a str) -> Cow<'a, str> {
        let runs = match self.matcher().redact_runs(input.as_bytes()) {
            Ok(runs) if runs.is_empty() => return Cow::Borrowed(input),
            Ok(runs) => runs,
            Err(Unredactable) => return Cow::Owned(String::from_utf8_lossy(REPLACEMENT).into()),
        };
        let mut widened: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
        for (start, end) in runs {
            let start = floor_char_boundary(input, start);
            let end = ceil_char_boundary(input, end);
            add_run(&mut widened, start, end);
        }
        let mut out = Vec::with_capacity(input.len());
        let mut in_run = false;
        render(
            input.as_bytes(),
            input.len(),
            &widened,
            &mut in_run,
            &mut out,
        );
        match String::from_utf8(out) {
            Ok(text) => Cow::Owned(text),
            // Unreachable: every cut is on a character boundary and REPLACEMENT is ASCII.
            Err(err) => Cow::Owned(String::from_utf8_lossy(err.as_bytes()).into_owned()),
        }
    }

    /// [`redact_str`](Self::redact_str) for text already owned: returns it unchanged, without a
    /// copy, when nothing matched.
    pub fn redact_string(&self, text: String) -> String {
        match self.redact_str(&text) {
            Cow::Borrowed(_) => text,
            Cow::Owned(clean) => clean,
        }
    }

    /// A streaming redactor over this value set, including values added after it was created.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            held: Zeroizing::new(Vec::new()),
            carry: 0,
            in_run: false,
        }
    }

    /// The current automata, the newest values' built now if any was added since the last build.
    fn matcher(&self) -> Arc<Matcher> {
        if let Some(matcher) = &self.read().matcher {
            return Arc::clone(matcher);
        }
        let mut shared = self.write();
        if let Some(matcher) = &shared.matcher {
            return Arc::clone(matcher);
        }
        shared.build(&Arc::downgrade(&self.shared))
    }

    fn read(&self) -> RwLockReadGuard<'_, Shared> {
        // A panic elsewhere cannot leave `Shared` half-updated in a way that leaks: at worst a
        // value is registered without its matcher being reset, which `matcher` then rebuilds.
        self.shared.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Shared> {
        self.shared.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The matcher could not be built or could not search: output is replaced wholesale (fail closed).
#[derive(Debug)]
struct Unredactable;

/// An immutable snapshot of every tier's automaton: what a search runs.
struct Matcher {
    /// The tiers that hold patterns; none when no value is registered (all passes through).
    tiers: Vec<Arc<Ready>>,
    /// A tier's automaton could not be built (absurdly many or large patterns): fail closed.
    unbuildable: bool,
}

/// The automaton and prefix index of a non-empty pattern set.
struct Ready {
    /// Leftmost-longest matcher over the patterns' heads. Its internal copies are not zeroized.
    automaton: AhoCorasick,
    /// For each of the automaton's patterns (a head), how many bytes an occurrence covers: the
    /// longest whole form with that head.
    covers: Vec<usize>,
    /// The largest of `covers`.
    max_cover: usize,
    /// Tells how much of a buffer's tail could still start an occurrence.
    prefixes: PrefixIndex,
}

impl Ready {
    /// The automaton and index over `patterns`; `None` if they have no bytes to match.
    fn build<'p>(
        patterns: impl Iterator<Item = &'p Pattern>,
    ) -> Result<Option<Ready>, Unredactable> {
        let mut heads: Vec<(&[u8], usize)> = patterns
            .map(|p| (p.head.as_slice(), p.len))
            .filter(|(head, _)| !head.is_empty())
            .collect();
        if heads.is_empty() {
            return Ok(None);
        }
        // By head, longest form first, so the dedup keeps what the longest form covers.
        heads.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
        heads.dedup_by(|later, first| later.0 == first.0);
        let sorted: Vec<&[u8]> = heads.iter().map(|(head, _)| *head).collect();
        let covers: Vec<usize> = heads.iter().map(|(_, len)| *len).collect();
        let prefixes = PrefixIndex::build(&sorted).ok_or(Unredactable)?;
        match AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            // Not a DFA: the automatic choice builds one for few patterns however long they
            // are, which cost seconds and hundreds of MiB per KiB of heads.
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .build(&sorted)
        {
            Ok(automaton) => Ok(Some(Ready {
                automaton,
                max_cover: covers.iter().copied().max().unwrap_or(0),
                covers,
                prefixes,
            })),
            Err(_) => Err(Unredactable),
        }
    }

    /// The union of all occurrences in `buf` that start before `limit`, as sorted, disjoint,
    /// non-touching `(start, end)` runs, together with the covered prefix `[0, carry)`.
    ///
    /// Every head that starts before `limit` lies entirely inside `buf` (that is what `limit`
    /// guarantees), so these runs are final. What a head covers may reach past the end of `buf`
    /// (a run's end can exceed `buf.len()`): in a stream, that is the next chunk's carry.
    fn covered_runs(
        &self,
        buf: &[u8],
        limit: usize,
        carry: usize,
    ) -> Result<Vec<(usize, usize)>, Unredactable> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        if carry > 0 {
            runs.push((0, carry));
        }
        let mut from = 0;
        while from < limit {
            // Leftmost-longest: the earliest start at or after `from`, and the longest pattern
            // there. Searching again from the next byte finds every start position that has an
            // occurrence, so overlapping occurrences are all covered.
            let found = self
                .automaton
                .try_find(Input::new(buf).span(from..buf.len()))
                .map_err(|_| Unredactable)?;
            let Some(found) = found else { break };
            if found.start() >= limit {
                break;
            }
            // `covers` has one entry per head, each at least the head's length.
            let cover = self
                .covers
                .get(found.pattern().as_usize())
                .copied()
                .unwrap_or(found.len());
            let end = found.start().saturating_add(cover);
            let run_end = add_run(&mut runs, found.start(), end);
            // An occurrence starting at `p` ends by `p + max_cover`: one that starts early
            // enough to end inside the current run cannot extend it, so skip those starts.
            from = (found.start() + 1).max(run_end.saturating_sub(self.max_cover));
        }
        Ok(runs)
    }
}

impl Matcher {
    /// The redacted runs of a whole input (no continuation expected), within it.
    fn redact_runs(&self, input: &[u8]) -> Result<Vec<(usize, usize)>, Unredactable> {
        if self.unbuildable {
            return if input.is_empty() {
                Ok(Vec::new())
            } else {
                Err(Unredactable)
            };
        }
        let mut runs = self.covered_runs(input, input.len(), 0)?;
        for run in &mut runs {
            run.1 = run.1.min(input.len());
        }
        Ok(runs)
    }

    /// [`Ready::covered_runs`] over every tier: the union of their occurrences.
    ///
    /// Taking the union is exact. At a given start, a longer head never covers less than a
    /// shorter one (a head shorter than [`MAX_HEAD`] is a whole form, and covers just itself), so
    /// the longest occurrence there, the one a single automaton over all the tiers would pick,
    /// covers the most of those the tiers found.
    fn covered_runs(
        &self,
        buf: &[u8],
        limit: usize,
        carry: usize,
    ) -> Result<Vec<(usize, usize)>, Unredactable> {
        if let [only] = self.tiers.as_slice() {
            return only.covered_runs(buf, limit, carry);
        }
        let mut all = vec![(0, carry)];
        for tier in &self.tiers {
            all.extend(tier.covered_runs(buf, limit, 0)?);
        }
        all.sort_unstable();
        let mut runs = Vec::with_capacity(all.len());
        for (start, end) in all.into_iter().filter(|(start, end)| end > start) {
            add_run(&mut runs, start, end);
        }
        Ok(runs)
    }

    /// Emits the part of `buf` that is decided (all of it at end of stream) and returns its length.
    ///
    /// `carry` is how many leading bytes of `buf` are covered by an occurrence that started in
    /// bytes already emitted; `in_run` is whether the last byte emitted was redacted. Both are
    /// updated for the next call.
    fn process(
        &self,
        buf: &[u8],
        end_of_stream: bool,
        carry: &mut usize,
        in_run: &mut bool,
        out: &mut Vec<u8>,
    ) -> usize {
        let fail_closed = |carry: &mut usize, in_run: &mut bool, out: &mut Vec<u8>| {
            if !buf.is_empty() && !*in_run {
                out.extend_from_slice(REPLACEMENT);
                *in_run = true;
            }
            *carry = 0;
            buf.len()
        };
        if self.unbuildable {
            return fail_closed(carry, in_run, out);
        }
        if self.tiers.is_empty() {
            // Patterns are never removed, so there is no carry to honour here.
            if !buf.is_empty() {
                out.extend_from_slice(buf);
                *in_run = false;
            }
            *carry = 0;
            return buf.len();
        }
        let decided = if end_of_stream {
            buf.len()
        } else {
            // What every tier has decided.
            self.tiers
                .iter()
                .map(|tier| tier.prefixes.undecided_start(buf))
                .min()
                .unwrap_or(buf.len())
        };
        match self.covered_runs(buf, decided, *carry) {
            Ok(runs) => {
                let covered_to = render(buf, decided, &runs, in_run, out);
                *carry = covered_to.saturating_sub(decided);
                decided
            }
            Err(Unredactable) => fail_closed(carry, in_run, out),
        }
    }
}

/// Adds the run `[start, end)` to `runs` (sorted by start, none starting before the last),
/// merged with the last run when they overlap or touch; returns where the last run now ends.
fn add_run(runs: &mut Vec<(usize, usize)>, start: usize, end: usize) -> usize {
    match runs.last_mut() {
        Some(last) if start <= last.1 => {
            last.1 = last.1.max(end);
            last.1
        }
        _ => {
            runs.push((start, end));
            end
        }
    }
}

/// Writes `buf[..limit]` to `out` with each run replaced, and returns the furthest run end.
///
/// A run that continues a redacted run emitted earlier (`in_run`) adds no second replacement.
fn render(
    buf: &[u8],
    limit: usize,
    runs: &[(usize, usize)],
    in_run: &mut bool,
    out: &mut Vec<u8>,
) -> usize {
    let mut cursor = 0;
    let mut covered_to = 0;
    for &(start, end) in runs {
        covered_to = covered_to.max(end);
        if start >= limit {
            break;
        }
        let start = start.max(cursor);
        if start > cursor {
            out.extend_from_slice(&buf[cursor..start]);
            *in_run = false;
        }
        if !*in_run {
            out.extend_from_slice(REPLACEMENT);
            *in_run = true;
        }
        cursor = cursor.max(end.min(limit));
    }
    if limit > cursor {
        out.extend_from_slice(&buf[cursor..limit]);
        *in_run = false;
    }
    covered_to
}

/// A redactor for one stream of output cut into arbitrary writes.
///
/// Bytes that could still be the start of a secret are held back (never more than the longest
/// pattern's length minus one) and released as soon as they cannot be; [`finish`] releases the
/// rest. For a fixed set of values, the concatenated output equals the one-shot
/// [`Redactor::redact`] of the whole stream. Values added to the [`Redactor`] while the stream is
/// running are redacted from then on (bytes already emitted cannot be taken back). Held-back
/// bytes are zeroized when released and on drop.
///
/// [`finish`]: StreamRedactor::finish
pub struct StreamRedactor {
    redactor: Redactor,
    /// Bytes seen but not yet emitted.
    held: Secret,
    /// How many leading bytes of `held` are already known to be redacted.
    carry: usize,
    /// Whether the last byte emitted was redacted (a run continuing it adds no replacement).
    in_run: bool,
}

impl fmt::Debug for StreamRedactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamRedactor")
            .field("held_back", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl StreamRedactor {
    /// Feeds a chunk; returns what is safe to emit now (already redacted).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.advance(chunk, false)
    }

    /// End of stream: returns the held-back rest, redacted.
    ///
    /// The redactor is then empty and may be used for a new stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let out = self.advance(&[], true);
        self.held.zeroize();
        self.carry = 0;
        self.in_run = false;
        out
    }

    fn advance(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        keyhole_protocol::extend_wiping(&mut self.held, chunk);
        let matcher = self.redactor.matcher();
        let mut out = Vec::with_capacity(self.held.len().saturating_add(REPLACEMENT.len()));
        let emitted = matcher.process(
            &self.held,
            end_of_stream,
            &mut self.carry,
            &mut self.in_run,
            &mut out,
        );
        remove_front_wiping(&mut self.held, emitted);
        out
    }
}

/// Removes the first `count` bytes of `buf`, wiping the bytes left behind past the new end, and
/// gives back an oversized allocation once a large chunk has gone through.
fn remove_front_wiping(buf: &mut Secret, count: usize) {
    const KEEP_CAPACITY: usize = 64 * 1024;
    let count = count.min(buf.len());
    let len = buf.len();
    buf.copy_within(count.., 0);
    buf[len - count..].zeroize();
    buf.truncate(len - count);
    if buf.capacity() > KEEP_CAPACITY && buf.len() < KEEP_CAPACITY / 4 {
        let mut smaller = Zeroizing::new(Vec::with_capacity(KEEP_CAPACITY / 4));
        smaller.extend_from_slice(buf);
        std::mem::swap(buf, &mut smaller);
    }
}

/// An index of all pattern prefixes (a trie with failure links) used to decide, at the end of a
/// buffer, which bytes could still be the start of an occurrence.
///
/// Nodes are numbered breadth-first from the root (0); a node's children are contiguous and
/// sorted by label. The labels are secret and zeroized on drop.
struct PrefixIndex {
    /// The byte on the edge into each node.
    labels: Secret,
    /// Length of the prefix each node stands for.
    depth: Vec<u32>,
    /// The node of the longest proper suffix of this prefix that is also a prefix.
    fail: Vec<u32>,
    /// The first child's node number.
    first_child: Vec<u32>,
    /// The number of children (at most 256).
    child_count: Vec<u16>,
    /// The longest pattern's length.
    max_len: usize,
}

impl PrefixIndex {
    /// Builds the index over sorted, deduplicated, non-empty patterns; `None` if it would not fit
    /// in 32-bit node numbers.
    fn build(sorted: &[&[u8]]) -> Option<PrefixIndex> {
        let max_len = sorted.iter().map(|p| p.len()).max().unwrap_or(0);
        // At most one node per pattern byte: sized up front so that growing never leaves an
        // unwiped copy of the labels behind.
        let nodes = sorted
            .iter()
            .fold(1usize, |sum, p| sum.saturating_add(p.len()));
        let mut labels = Zeroizing::new(Vec::with_capacity(nodes));
        labels.push(0);
        let mut index = PrefixIndex {
            labels,
            depth: vec![0],
            fail: vec![0],
            first_child: vec![0],
            child_count: vec![0],
            max_len,
        };
        // The patterns sharing each node's prefix form a contiguous range of `sorted`, and those
        // equal to the prefix come first.
        let mut ranges: Vec<(usize, usize)> = vec![(0, sorted.len())];
        let mut node = 0;
        while node < ranges.len() {
            let (low, high) = ranges[node];
            let depth = usize::try_from(index.depth[node]).ok()?;
            let mut i = low;
            while i < high && sorted[i].len() == depth {
                i += 1;
            }
            index.first_child[node] = u32::try_from(ranges.len()).ok()?;
            let mut children: u16 = 0;
            while i < high {
                let label = sorted[i][depth];
                let mut j = i + 1;
                while j < high && sorted[j][depth] == label {
                    j += 1;
                }
                index.labels.push(label);
                index.depth.push(u32::try_from(depth + 1).ok()?);
                index.fail.push(0);
                index.first_child.push(0);
                index.child_count.push(0);
                ranges.push((i, j));
                children += 1;
                i = j;
            }
            index.child_count[node] = children;
            node += 1;
        }
        // Failure links, breadth-first: a node's parent and every shallower node are done first.
        for parent in 0..index.depth.len() {
            let first = index.first_child[parent] as usize;
            for child in first..first + usize::from(index.child_count[parent]) {
                if parent == 0 {
                    continue;
                }
                let label = index.labels[child];
                let mut state = index.fail[parent];
                index.fail[child] = loop {
                    if let Some(next) = index.child(state, label) {
                        break next;
                    }
                    if state == 0 {
                        break 0;
                    }
                    state = index.fail[state as usize];
                };
            }
        }
        Some(index)
    }

    /// The child of `node` along `label`, if any.
    fn child(&self, node: u32, label: u8) -> Option<u32> {
        let node = node as usize;
        let first = self.first_child[node] as usize;
        let count = usize::from(self.child_count[node]);
        let offset = self.labels[first..first + count]
            .binary_search(&label)
            .ok()?;
        u32::try_from(first + offset).ok()
    }

    /// The node after reading `byte` in `node` (Aho-Corasick transition).
    fn step(&self, mut node: u32, byte: u8) -> u32 {
        loop {
            if let Some(next) = self.child(node, byte) {
                return next;
            }
            if node == 0 {
                return 0;
            }
            node = self.fail[node as usize];
        }
    }

    /// The earliest position `p` such that `buf[p..]` is a proper prefix of some pattern, or
    /// `buf.len()` if there is none. Always at least `buf.len() - (max_len - 1)`.
    fn undecided_start(&self, buf: &[u8]) -> usize {
        // Only a suffix shorter than the longest pattern can be a proper prefix of one.
        let start = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        let mut node = 0;
        for &byte in &buf[start..] {
            node = self.step(node, byte);
        }
        // The failure chain lists every suffix that is a prefix, longest first; the first one
        // that can still grow (has children) is the answer.
        while node != 0 && self.child_count[node as usize] == 0 {
            node = self.fail[node as usize];
        }
        buf.len() - self.depth[node as usize] as usize
    }
}

/// An [`AsyncWrite`] adapter that redacts through a [`StreamRedactor`] and writes to `inner`;
/// shutdown flushes the held-back tail.
///
/// `poll_flush` writes out everything already redacted but not the held-back tail (at most the
/// longest pattern's length minus one bytes), since that could still be the start of a secret.
/// Call `shutdown` at the end of the stream: dropping the writer discards (and wipes) the tail.
pub struct RedactingWriter<W> {
    inner: W,
    stream: StreamRedactor,
    /// Redacted bytes not yet accepted by `inner`, from `written` on.
    pending: Vec<u8>,
    written: usize,
    /// An error from `inner` met after input was already accepted, reported on the next call.
    deferred: Option<io::Error>,
    /// Set once shutdown has taken the held-back tail.
    finished: bool,
}

impl<W> fmt::Debug for RedactingWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactingWriter")
            .field("stream", &self.stream)
            .field("pending", &(self.pending.len() - self.written))
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<W> RedactingWriter<W> {
    /// Wraps `inner` so that everything written through it is redacted with `redactor`'s values
    /// (including values added later).
    pub fn new(inner: W, redactor: &Redactor) -> RedactingWriter<W> {
        RedactingWriter {
            inner,
            stream: redactor.stream(),
            pending: Vec::new(),
            written: 0,
            deferred: None,
            finished: false,
        }
    }
}

impl<W: AsyncWrite + Unpin> RedactingWriter<W> {
    /// Writes `pending` to `inner` until it is all accepted.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(err) = self.deferred.take() {
            return Poll::Ready(Err(err));
        }
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "redacting writer: the inner writer accepted no bytes",
                )));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RedactingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "redacting writer: write after shutdown",
            )));
        }
        // Backpressure: the previous chunk must be out before a new one is taken.
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.pending = this.stream.push(buf);
        this.written = 0;
        // The input is taken whatever happens next; try to pass it on now for low latency.
        if let Poll::Ready(Err(err)) = this.poll_drain(cx) {
            this.deferred = Some(err);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.finished {
            let tail = this.stream.finish();
            this.pending.extend_from_slice(&tail);
            this.finished = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The largest character boundary of `text` at or before `index`.
fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while index > 0 && !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// The smallest character boundary of `text` at or after `index`.
fn ceil_char_boundary(text: &str, mut index: usize) -> usize {
    while index < text.len() && !text.is_char_boundary(index) {
        index += 1;
    }
    index.min(text.len())
}

/// Every form of `value` that is registered, deduplicated (see [`Redactor::add`]).
fn encoded_forms(value: &[u8]) -> Vec<Secret> {
    let mut forms: Vec<Secret> = Vec::with_capacity(32);
    forms.push(Zeroizing::new(value.to_vec()));

    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(base64_encode(engine, value));
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for shift in 0..3 {
            if let Some(core) = base64_core(engine, value, shift) {
                forms.push(core);
            }
        }
    }

    forms.push(hex_encode(value, b"0123456789abcdef"));
    forms.push(hex_encode(value, b"0123456789ABCDEF"));

    let rfc3986 = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let whatwg_form = |b: u8| b.is_ascii_alphanumeric() || b"*-._".contains(&b);
    let uri_component = |b: u8| b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b);
    let python_quote = |b: u8| rfc3986(b) || b == b'/';
    for digits in [b"0123456789ABCDEF", b"0123456789abcdef"] {
        forms.push(percent_encode(value, rfc3986, false, digits));
        forms.push(percent_encode(value, rfc3986, true, digits));
        forms.push(percent_encode(value, whatwg_form, true, digits));
    }
    forms.push(percent_encode(
        value,
        uri_component,
        false,
        b"0123456789ABCDEF",
    ));
    forms.push(percent_encode(
        value,
        python_quote,
        false,
        b"0123456789ABCDEF",
    ));

    if std::str::from_utf8(value).is_ok() {
        forms.push(json_escape(value));
    }

    forms.retain(|form| form.len() >= MIN_REDACT_LEN);
    forms.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
    forms.dedup_by(|a, b| a.as_slice() == b.as_slice());
    forms
}

/// `data` in base64, written straight into a zeroizing buffer (empty on overflow).
fn base64_encode(engine: &GeneralPurpose, data: &[u8]) -> Secret {
    let padding = engine.config().encode_padding();
    let Some(len) = base64::encoded_len(data.len(), padding) else {
        return Zeroizing::new(Vec::new());
    };
    let mut out = Zeroizing::new(vec![0; len]);
    match engine.encode_slice(data, &mut out[..]) {
        Ok(written) => out.truncate(written),
        Err(_) => out.clear(),
    }
    out
}

/// The base64 characters that depend only on `value` when it starts `shift` bytes into a
/// 3-byte group of a longer base64 text, if there are at least [`MIN_BASE64_CORE_LEN`] of them.
fn base64_core(engine: &GeneralPurpose, value: &[u8], shift: usize) -> Option<Secret> {
    let mut shifted = Zeroizing::new(Vec::with_capacity(shift + value.len()));
    shifted.resize(shift, 0);
    shifted.extend_from_slice(value);
    let encoded = base64_encode(engine, &shifted);
    // Character i carries bits [6i, 6i + 6): skip those that touch the `shift` bytes before the
    // value and those that would also carry bits of whatever follows it.
    let first = (shift * 8).div_ceil(6);
    let last = (shifted.len() * 8 / 6).min(encoded.len());
    if last < first || last - first < MIN_BASE64_CORE_LEN {
        return None;
    }
    Some(Zeroizing::new(encoded[first..last].to_vec()))
}

fn hex_encode(data: &[u8], digits: &[u8; 16]) -> Secret {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len().saturating_mul(2)));
    for &byte in data {
        out.push(digits[usize::from(byte >> 4)]);
        out.push(digits[usize::from(byte & 0x0f)]);
    }
    out
}

/// Percent-encodes every byte for which `keep` is false (and space as `+` if `space_plus`).
fn percent_encode(
    data: &[u8],
    keep: impl Fn(u8) -> bool,
    space_plus: bool,
    digits: &[u8; 16],
) -> Secret {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len().saturating_mul(3)));
    for &byte in data {
        if keep(byte) {
            out.push(byte);
        } else if space_plus && byte == b' ' {
            out.push(b'+');
        } else {
            out.push(b'%');
            out.push(digits[usize::from(byte >> 4)]);
            out.push(digits[usize::from(byte & 0x0f)]);
        }
    }
    out
}

/// The inside of a JSON string holding `text` (UTF-8), escaped as serde_json does.
fn json_escape(text: &[u8]) -> Secret {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Zeroizing::new(Vec::with_capacity(text.len().saturating_mul(6)));
    for &byte in text {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(DIGITS[usize::from(byte >> 4)]);
                out.push(DIGITS[usize::from(byte & 0x0f)]);
            }
            _ => out.push(byte),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

    use super::*;
    use proptest::prelude::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Streams `input` cut at `cuts` (sorted positions) and checks the held-back bound.
    fn stream_cut(redactor: &Redactor, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut stream = redactor.stream();
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(last, input.len());
            out.extend(stream.push(&input[last..cut]));
            assert_held_back_bound(redactor, &stream);
            last = cut;
        }
        out.extend(stream.finish());
        assert!(stream.held.is_empty());
        out
    }

    fn max_pattern_len(redactor: &Redactor) -> usize {
        let matcher = redactor.matcher();
        matcher
            .tiers
            .iter()
            .map(|t| t.prefixes.max_len)
            .max()
            .unwrap_or(0)
    }

    fn assert_held_back_bound(redactor: &Redactor, stream: &StreamRedactor) {
        let bound = max_pattern_len(redactor).saturating_sub(1);
        assert!(
            stream.held.len() <= bound,
            "held back {} > {bound}",
            stream.held.len()
        );
    }

    fn redactor_with(values: &[&[u8]]) -> Redactor {
        let redactor = Redactor::new();
        for value in values {
            assert!(redactor.add(value));
        }
        redactor
    }

    /// A value whose forms all differ: padding, `+` and `/` in base64, space, `~`, `*`, `/`.
    const VALUE: &[u8] = b"hunter2 ~*/?>>";

    /// Every form of `VALUE`, computed by hand or by independent encoders.
    fn forms_of_value() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("raw", VALUE.to_vec()),
            ("base64", b"aHVudGVyMiB+Ki8/Pj4=".to_vec()),
            ("base64 no pad", b"aHVudGVyMiB+Ki8/Pj4".to_vec()),
            ("base64url", b"aHVudGVyMiB-Ki8_Pj4=".to_vec()),
            ("base64url no pad", b"aHVudGVyMiB-Ki8_Pj4".to_vec()),
            ("hex lower", hex::encode(VALUE).into_bytes()),
            ("hex upper", hex::encode_upper(VALUE).into_bytes()),
            ("rfc3986", b"hunter2%20~%2A%2F%3F%3E%3E".to_vec()),
            ("rfc3986 lower", b"hunter2%20~%2a%2f%3f%3e%3e".to_vec()),
            ("rfc3986 plus", b"hunter2+~%2A%2F%3F%3E%3E".to_vec()),
            ("form", b"hunter2+%7E*%2F%3F%3E%3E".to_vec()),
            ("encodeURIComponent", b"hunter2%20~*%2F%3F%3E%3E".to_vec()),
            ("python quote", b"hunter2%20~%2A/%3F%3E%3E".to_vec()),
        ]
    }

    #[test]
    fn forms_are_distinct_and_registered() {
        let forms = forms_of_value();
        for (i, (name, form)) in forms.iter().enumerate() {
            for (other, form2) in &forms[i + 1..] {
                assert_ne!(form, form2, "{name} == {other}");
            }
        }
        let registered = encoded_forms(VALUE);
        for (name, form) in &forms {
            assert!(
                registered.iter().any(|r| r.as_slice() == form.as_slice()),
                "{name} not registered"
            );
        }
    }

    #[test]
    fn every_form_redacted_one_shot() {
        let redactor = redactor_with(&[VALUE]);
        for (name, form) in forms_of_value() {
            let input = [b"before ".as_slice(), &form, b" after"].concat();
            let out = redactor.redact(&input);
            assert_eq!(&*out, b"before [REDACTED] after".as_slice(), "{name}");
        }
    }

    #[test]
    fn url_form_encodes_space_with_plus_and_tilde() {
        let redactor = redactor_with(&[b"a b~c"]);
        assert_eq!(&*redactor.redact(b"x=a+b%7Ec&"), b"x=[REDACTED]&");
        assert_eq!(&*redactor.redact(b"x=a%20b~c&"), b"x=[REDACTED]&");
        assert_eq!(&*redactor.redact(b"x=a+b~c&"), b"x=[REDACTED]&");
    }

    #[test]
    fn base64_inside_a_longer_text_is_redacted() {
        let secret = b"correct-horse-battery-staple";
        let redactor = redactor_with(&[secret]);
        for user in ["", "u:", "us:", "use:"] {
            let credentials = [user.as_bytes(), secret].concat();
            let header = format!("Authorization: Basic {}\n", STANDARD.encode(&credentials));
            let out = redactor.redact(header.as_bytes());
            assert!(contains(&out, REPLACEMENT), "{user}: {}", header);
            // Whatever stays visible carries at most the bits next to the user name.
            let visible = String::from_utf8(out.into_owned()).unwrap();
            let kept = visible
                .trim_start_matches("Authorization: Basic ")
                .split("[REDACTED]")
                .map(str::len)
                .sum::<usize>();
            assert!(kept <= STANDARD.encode(user).len() + 4, "{visible}");
        }
    }

    #[test]
    fn json_escaped_form_is_redacted() {
        let redactor = redactor_with(&[b"pa\"ss\\wo\nrd"]);
        let log = br#"{"msg":"pa\"ss\\wo\nrd"}"#;
        assert_eq!(&*redactor.redact(log), br#"{"msg":"[REDACTED]"}"#);
    }

    #[test]
    fn split_at_every_point_across_two_pushes() {
        let redactor = redactor_with(&[VALUE]);
        for (name, form) in forms_of_value() {
            let input = [b"log: ".as_slice(), &form, b" end"].concat();
            let expected = redactor.redact(&input).into_owned();
            for cut in 0..=input.len() {
                let out = stream_cut(&redactor, &input, &[cut]);
                assert_eq!(out, expected, "{name} cut at {cut}");
                assert!(!contains(&out, &form));
            }
        }
    }

    #[test]
    fn one_byte_pushes() {
        let redactor = redactor_with(&[VALUE]);
        for (name, form) in forms_of_value() {
            let input = [b"a".as_slice(), &form, b"z", &form].concat();
            let cuts: Vec<usize> = (0..input.len()).collect();
            let out = stream_cut(&redactor, &input, &cuts);
            assert_eq!(out, b"a[REDACTED]z[REDACTED]".as_slice(), "{name}");
        }
    }

    /// `len` pseudo-random bytes (a fixed seed): no window of a head's length recurs in them,
    /// so the value's head occurs only where the value starts.
    fn long_value(len: usize) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut bytes = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(0x9E37_79B9).fill_bytes(&mut bytes);
        bytes
    }

    #[test]
    fn a_long_value_is_matched_by_its_head_and_covered_whole() {
        let value = long_value(300 * 1024);
        let redactor = Redactor::new();
        assert!(redactor.add(&value));
        // The automaton, the prefix index and what a stream holds back stay within the head.
        assert_eq!(max_pattern_len(&redactor), MAX_HEAD);
        for form in [
            value.clone(),
            hex_encode(&value, b"0123456789abcdef").to_vec(),
        ] {
            let input = [b"before ".as_slice(), &form, b" after"].concat();
            assert_eq!(&*redactor.redact(&input), b"before [REDACTED] after");
            let cuts: Vec<usize> = (0..input.len()).step_by(4093).collect();
            assert_eq!(
                stream_cut(&redactor, &input, &cuts),
                b"before [REDACTED] after"
            );
            // Printed in part: the head is enough, and what follows it is covered up to the
            // form's length (here, the end of the text).
            let cut_short = [b"before ".as_slice(), &form[..MAX_HEAD + 10], b" after"].concat();
            assert_eq!(&*redactor.redact(&cut_short), b"before [REDACTED]");
            assert_eq!(
                stream_cut(&redactor, &cut_short, &[3, 200]),
                b"before [REDACTED]"
            );
        }
        // Less than a head is not an occurrence.
        let input = [b"x ".as_slice(), &value[..MAX_HEAD - 1], b" y"].concat();
        assert!(matches!(redactor.redact(&input), Cow::Borrowed(_)));
    }

    #[test]
    fn a_run_that_outlasts_the_chunk_carries_into_the_next() {
        let value = long_value(1000);
        let redactor = Redactor::new();
        assert!(redactor.add(&value));
        let input = [b"<".as_slice(), &value, b">", &value, b"!"].concat();
        for step in [1, 7, 128, 129, 500, 999] {
            let cuts: Vec<usize> = (0..input.len()).step_by(step).collect();
            assert_eq!(
                stream_cut(&redactor, &input, &cuts),
                b"<[REDACTED]>[REDACTED]!",
                "cut every {step}"
            );
        }
    }

    #[test]
    fn non_utf8_value() {
        let value = b"\xff\xfe\x00\x80secret\xc3";
        let redactor = redactor_with(&[value]);
        let input = [b"\x00\x01".as_slice(), value, b"\xc3\xa9"].concat();
        assert_eq!(&*redactor.redact(&input), b"\x00\x01[REDACTED]\xc3\xa9");
        let hex_input = format!("key={}", hex::encode(value));
        assert_eq!(&*redactor.redact_str(&hex_input), "key=[REDACTED]");
        let b64 = URL_SAFE_NO_PAD.encode(value);
        assert_eq!(&*redactor.redact_str(&format!("<{b64}>")), "<[REDACTED]>");
        let cuts: Vec<usize> = (0..input.len()).collect();
        assert_eq!(
            stream_cut(&redactor, &input, &cuts),
            &*redactor.redact(&input)
        );
    }

    #[test]
    fn redact_str_widens_to_whole_characters() {
        // The value starts inside "é" (0xc3 0xa9).
        let redactor = redactor_with(&[b"\xa9xyz"]);
        let out = redactor.redact_str("café xyz caféxyz ok");
        assert_eq!(out, "café xyz caf[REDACTED] ok");
        // The value ends inside "ü" (0xc3 0xbc).
        let redactor = redactor_with(&[b"abc\xc3"]);
        assert_eq!(redactor.redact_str("xabcü abcd"), "x[REDACTED] abcd");
    }

    #[test]
    fn redact_str_is_lossless_without_matches() {
        let redactor = redactor_with(&[b"secret-value"]);
        let text = "héllo wörld, nothing to see 🙂";
        assert!(matches!(redactor.redact_str(text), Cow::Borrowed(t) if t == text));
        assert_eq!(
            redactor.redact_str("a secret-value ünd"),
            "a [REDACTED] ünd"
        );
    }

    #[test]
    fn adjacent_values_become_one_replacement() {
        let redactor = redactor_with(&[b"alpha-one", b"bravo-two"]);
        assert_eq!(
            &*redactor.redact(b"<alpha-onebravo-two>"),
            b"<[REDACTED]>".as_slice()
        );
        assert_eq!(
            &*redactor.redact(b"<alpha-one bravo-two>"),
            b"<[REDACTED] [REDACTED]>".as_slice()
        );
        assert_eq!(
            &*redactor.redact(b"alpha-onealpha-one"),
            b"[REDACTED]".as_slice()
        );
    }

    #[test]
    fn value_containing_another_is_redacted_whole() {
        let redactor = redactor_with(&[b"secret", b"my-secret-value"]);
        assert_eq!(&*redactor.redact(b"x my-secret-value y"), b"x [REDACTED] y");
        assert_eq!(&*redactor.redact(b"x secret y"), b"x [REDACTED] y");
        let input = b"x my-secret-value y";
        for cut in 0..=input.len() {
            assert_eq!(stream_cut(&redactor, input, &[cut]), b"x [REDACTED] y");
        }
    }

    #[test]
    fn overlapping_values_leave_no_byte() {
        let redactor = redactor_with(&[b"alpha-beta", b"beta-gamma"]);
        let input = b"xx alpha-beta-gamma yy";
        assert_eq!(&*redactor.redact(input), b"xx [REDACTED] yy");
        for cut in 0..=input.len() {
            assert_eq!(stream_cut(&redactor, input, &[cut]), b"xx [REDACTED] yy");
        }
        let cuts: Vec<usize> = (0..input.len()).collect();
        assert_eq!(stream_cut(&redactor, input, &cuts), b"xx [REDACTED] yy");
    }

    #[test]
    fn text_without_secrets_is_byte_identical() {
        let redactor = redactor_with(&[VALUE, b"another secret"]);
        let text: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        assert!(matches!(redactor.redact(&text), Cow::Borrowed(_)));
        for step in [1, 2, 3, 7, 64, 1000] {
            let cuts: Vec<usize> = (step..text.len()).step_by(step).collect();
            assert_eq!(stream_cut(&redactor, &text, &cuts), text);
        }
        // Near misses are held back, then released unchanged.
        let near = b"hunter2 ~*/?> hunter2 ~*/?";
        let mut stream = redactor.stream();
        let mut out = stream.push(near);
        assert!(out.len() < near.len());
        out.extend(stream.finish());
        assert_eq!(out, near);
    }

    #[test]
    fn empty_redactor_passes_everything() {
        let redactor = Redactor::new();
        assert!(redactor.is_empty());
        assert!(matches!(redactor.redact(b"anything"), Cow::Borrowed(_)));
        let mut stream = redactor.stream();
        assert_eq!(stream.push(b"abc"), b"abc");
        assert!(stream.finish().is_empty());
    }

    #[test]
    fn short_values_are_refused() {
        let redactor = Redactor::new();
        assert!(!redactor.add(b""));
        assert!(!redactor.add(b"abc"));
        assert!(redactor.is_empty());
        assert!(redactor.add(b"abcd"));
        assert!(redactor.add(b"abcd"), "a repeated value is still redacted");
        assert_eq!(redactor.len(), 1);
        assert_eq!(&*redactor.redact(b"abc abcd"), b"abc [REDACTED]");
    }

    #[test]
    fn held_back_is_released_as_soon_as_possible() {
        let redactor = redactor_with(&[b"secret-value"]);
        let mut stream = redactor.stream();
        assert_eq!(stream.push(b"a secret-"), b"a ");
        assert_eq!(stream.held.len(), 7);
        // "secret-x" can no longer start an occurrence, nor can any of its suffixes.
        assert_eq!(stream.push(b"x"), b"secret-x");
        assert!(stream.held.is_empty());
        assert_eq!(stream.push(b"secret-secret-val"), b"secret-");
        assert_eq!(stream.push(b"ue!"), b"[REDACTED]!");
        // A complete occurrence that no longer pattern extends is not held back at all.
        assert_eq!(stream.push(b"a secret-value"), b"a [REDACTED]");
        assert!(stream.held.is_empty());
        // The longest pattern minus its last byte is the most ever held back.
        let longest = encoded_forms(b"secret-value")
            .into_iter()
            .max_by_key(|form| form.len())
            .unwrap();
        assert_eq!(longest.len(), max_pattern_len(&redactor));
        // (A separator, or the next occurrence would continue the same redacted run.)
        assert_eq!(stream.push(b" "), b" ");
        assert!(stream.push(&longest[..longest.len() - 1]).is_empty());
        assert_eq!(stream.held.len(), longest.len() - 1);
        assert_eq!(stream.push(&longest[longest.len() - 1..]), b"[REDACTED]");
        assert!(stream.finish().is_empty());
    }

    #[test]
    fn values_added_mid_stream_are_redacted_from_then_on() {
        let redactor = Redactor::new();
        let mut stream = redactor.stream();
        assert_eq!(stream.push(b"late-secret "), b"late-secret ");
        assert!(redactor.clone().add(b"late-secret"));
        let mut out = stream.push(b"then late-");
        out.extend(stream.push(b"secret again"));
        out.extend(stream.finish());
        assert_eq!(out, b"then [REDACTED] again");
    }

    #[test]
    fn values_added_one_at_a_time_build_few_tiers_that_redact_like_one() {
        // As in a gateway: each value is registered, then something is redacted.
        let values: Vec<Vec<u8>> = (0..100u32)
            .map(|i| format!("secret-number-{i}-{}", i.wrapping_mul(7919)).into_bytes())
            .collect();
        let tiered = Redactor::new();
        for value in &values {
            assert!(tiered.add(value));
            let _ = tiered.redact(b"a log line");
        }
        let at_once = Redactor::new();
        for value in &values {
            assert!(at_once.add(value));
        }
        let _ = at_once.redact(b"a log line");

        let shared = tiered.read();
        let sizes: Vec<usize> = shared.tiers.iter().map(|t| t.len).collect();
        let total: usize = sizes.iter().sum();
        assert!(shared.pending.is_empty());
        assert_eq!(
            at_once.read().tiers.len(),
            1,
            "values added together share a tier"
        );
        for pair in sizes.windows(2) {
            assert!(
                pair[0] > 2 * pair[1],
                "each tier more than twice the next: {sizes:?}"
            );
        }
        assert!(
            sizes.len() <= total.ilog2() as usize,
            "{} tiers for {total} forms: {sizes:?}",
            sizes.len()
        );
        assert!(sizes.len() > 1, "{sizes:?}");
        drop(shared);

        // Every form of every value, with text between, and two values touching.
        let mut text = b"start ".to_vec();
        for value in &values {
            for form in encoded_forms(value) {
                text.extend_from_slice(&form);
                text.extend_from_slice(b" | ");
            }
        }
        text.extend_from_slice(b"secret-number-1-7919secret-number-10-79190 end");
        let one_shot = tiered.redact(&text).into_owned();
        assert_eq!(one_shot, at_once.redact(&text).into_owned());
        assert!(
            !contains(&one_shot, b"secret-number"),
            "every form is covered"
        );
        let cuts: Vec<usize> = (0..text.len()).step_by(37).collect();
        assert_eq!(stream_cut(&tiered, &text, &cuts), one_shot);
    }

    /// Waits until no background merge is under way.
    fn settle(redactor: &Redactor) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while redactor.read().tiers.iter().any(|t| t.merging) {
            assert!(std::time::Instant::now() < deadline, "a merge never ended");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn large_merges_run_in_the_background_and_every_value_stays_redacted() {
        // About 6 forms each: merges past MERGE_IN_LINE come once the set passes ~700 values.
        let values: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| {
                format!("background-merge-value-{i:04}-{}", i.wrapping_mul(104_729)).into_bytes()
            })
            .collect();
        let redactor = Redactor::new();
        let mut seen_merging = false;
        for (i, value) in values.iter().enumerate() {
            assert!(redactor.add(value));
            // The value just added, and one added long before, whatever is being merged.
            let text = [b"x ".as_slice(), value, b" y ", &values[i / 2], b" z"].concat();
            assert_eq!(
                &*redactor.redact(&text),
                b"x [REDACTED] y [REDACTED] z".as_slice()
            );
            seen_merging |= redactor.read().tiers.iter().any(|t| t.merging);
        }
        assert!(
            seen_merging,
            "no merge was large enough to leave the request's path"
        );
        settle(&redactor);
        let _ = redactor.redact(b"snapshot");
        let shared = redactor.read();
        let sizes: Vec<usize> = shared.tiers.iter().map(|t| t.len).collect();
        for pair in sizes.windows(2) {
            assert!(
                pair[0] > 2 * pair[1],
                "each tier more than twice the next: {sizes:?}"
            );
        }
        let total: usize = sizes.iter().sum();
        assert!(sizes.len() <= total.ilog2() as usize, "{sizes:?}");
        drop(shared);
        let mut text = Vec::new();
        for value in values.iter().step_by(7) {
            text.extend_from_slice(value);
            text.extend_from_slice(b" | ");
        }
        let out = redactor.redact(&text).into_owned();
        assert!(!contains(&out, b"background-merge-value"));
        assert_eq!(out.len(), (values.len() / 7 + 1) * (REPLACEMENT.len() + 3));
    }

    #[test]
    fn clones_share_values_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Redactor>();
        assert_send_sync::<StreamRedactor>();

        let redactor = Redactor::new();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let redactor = redactor.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let value = format!("thread-{t}-value-{i}");
                        assert!(redactor.add(value.as_bytes()));
                        let text = format!("<{value}>");
                        assert_eq!(redactor.redact_str(&text), "<[REDACTED]>");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(redactor.len(), 200);
    }

    #[test]
    fn prefix_index_finds_the_earliest_proper_prefix() {
        let patterns: Vec<&[u8]> = vec![b"abcd", b"abcdef", b"bcx", b"cdab"];
        let mut sorted = patterns.clone();
        sorted.sort_unstable();
        let index = PrefixIndex::build(&sorted).unwrap();
        assert_eq!(index.undecided_start(b"zzab"), 2);
        assert_eq!(index.undecided_start(b"zzabc"), 2);
        // "abcd" is complete but "abcdef" may follow; "cd" may start "cdab".
        assert_eq!(index.undecided_start(b"zabcd"), 1);
        assert_eq!(index.undecided_start(b"abcdef"), 6);
        assert_eq!(index.undecided_start(b"zzzz"), 4);
        assert_eq!(index.undecided_start(b""), 0);
        assert_eq!(index.undecided_start(b"cda"), 0);
    }

    #[tokio::test]
    async fn redacting_writer_over_vec() {
        use tokio::io::AsyncWriteExt;
        let redactor = redactor_with(&[VALUE]);
        let mut writer = RedactingWriter::new(Vec::new(), &redactor);
        writer.write_all(b"token=hunter2 ~").await.unwrap();
        writer.flush().await.unwrap();
        writer
            .write_all(b"*/?>> done, and hunter2 ~")
            .await
            .unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(writer.inner, b"token=[REDACTED] done, and hunter2 ~");
        assert!(writer.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn redacting_writer_over_small_duplex() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let redactor = redactor_with(&[VALUE]);
        let (client, mut server) = tokio::io::duplex(3);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut writer = RedactingWriter::new(client, &redactor);
        let input = [b"start ".as_slice(), VALUE, b" middle ", VALUE].concat();
        for byte in &input {
            writer.write_all(std::slice::from_ref(byte)).await.unwrap();
        }
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(reader.await.unwrap(), b"start [REDACTED] middle [REDACTED]");
    }

    proptest! {
        #[test]
        fn held_back_never_exceeds_bound(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 4..24), 1..4),
            pieces in proptest::collection::vec((0usize..4, 0usize..40, 0usize..40), 0..12),
            cuts in proptest::collection::vec(0usize..400, 0..30),
        ) {
            let redactor = Redactor::new();
            for value in &values {
                redactor.add(value);
            }
            // Text made of fragments of the values' forms, to keep partial matches frequent.
            let forms: Vec<Vec<u8>> = values.iter().flat_map(|v| encoded_forms(v)).map(|f| f.to_vec()).collect();
            let mut input = Vec::new();
            for (which, from, len) in pieces {
                let form = &forms[which % forms.len()];
                let from = from % form.len();
                let to = (from + len).min(form.len());
                input.extend_from_slice(&form[from..to]);
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let streamed = stream_cut(&redactor, &input, &cuts);
            prop_assert_eq!(streamed, redactor.redact(&input).into_owned());
        }
    }
}
