//! Results: one human-readable line per case, a summary line, and JUnit XML.

use std::fmt;
use std::time::Duration;

use keyhole_protocol::Encoding;
use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// The provider behaved as required.
    Pass,
    /// It did not: what was expected and what came back.
    Fail(String),
    /// The case does not apply, and why (usually an undeclared capability).
    Skip(String),
}

/// One case's result under one encoding.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The case's name, such as `revoke.resolve-revoked`.
    pub name: &'static str,
    /// The encoding it ran over.
    pub encoding: Encoding,
    /// How it ended.
    pub status: Status,
    /// How long it took.
    pub elapsed: Duration,
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.elapsed.as_secs_f64() * 1000.0;
        match &self.status {
            Status::Pass => write!(f, "PASS  [{}] {} ({ms:.1} ms)", self.encoding, self.name),
            Status::Fail(why) => write!(f, "FAIL  [{}] {}: {why}", self.encoding, self.name),
            Status::Skip(why) => write!(f, "SKIP  [{}] {}: {why}", self.encoding, self.name),
        }
    }
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Every case under every encoding, in run order.
    pub results: Vec<CaseResult>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Count of passed cases.
    pub fn passed(&self) -> usize {
        self.count(|s| matches!(s, Status::Pass))
    }

    /// Count of failed cases.
    pub fn failed(&self) -> usize {
        self.count(|s| matches!(s, Status::Fail(_)))
    }

    /// Count of skipped cases.
    pub fn skipped(&self) -> usize {
        self.count(|s| matches!(s, Status::Skip(_)))
    }

    fn count(&self, f: impl Fn(&Status) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.status)).count()
    }

    /// The names of the failed cases (with their encoding).
    pub fn failures(&self) -> Vec<(Encoding, &'static str)> {
        self.results
            .iter()
            .filter(|r| matches!(r.status, Status::Fail(_)))
            .map(|r| (r.encoding, r.name))
            .collect()
    }

    /// `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }

    /// The run as JUnit XML: one test suite per encoding.
    pub fn junit(&self) -> String {
        let mut report = quick_junit::Report::new("keyhole-conformance");
        report.set_time(self.elapsed);
        for encoding in Encoding::ALL {
            let cases: Vec<&CaseResult> = self
                .results
                .iter()
                .filter(|r| r.encoding == encoding)
                .collect();
            if cases.is_empty() {
                continue;
            }
            let mut suite = TestSuite::new(format!("keyhole-conformance.{encoding}"));
            for r in cases {
                let status = match &r.status {
                    Status::Pass => TestCaseStatus::success(),
                    Status::Fail(why) => {
                        let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        s.set_message(why.clone());
                        s
                    }
                    Status::Skip(why) => {
                        let mut s = TestCaseStatus::skipped();
                        s.set_message(why.clone());
                        s
                    }
                };
                let mut case = TestCase::new(r.name, status);
                case.set_classname(format!("keyhole-conformance.{encoding}"));
                case.set_time(r.elapsed);
                suite.add_test_case(case);
            }
            report.add_test_suite(suite);
        }
        report
            .to_string()
            .unwrap_or_else(|e| format!("<!-- JUnit serialization failed: {e} -->"))
    }
}
