//! The finX connect flows (the nine `/onetime/*` and `/ongoing/*` kinds) and what each needs
//! from the gateway.

/// One flow-initiation endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    OnetimeAccess,
    OnetimeIncomeReport,
    OnetimeAccountVerification,
    OnetimeRiskReport,
    OnetimePayment,
    OngoingAccess,
    OngoingSync,
    OngoingRiskReport,
    OngoingPayment,
}

impl FlowKind {
    /// Every flow, for tests and docs.
    pub const ALL: [FlowKind; 9] = [
        Self::OnetimeAccess,
        Self::OnetimeIncomeReport,
        Self::OnetimeAccountVerification,
        Self::OnetimeRiskReport,
        Self::OnetimePayment,
        Self::OngoingAccess,
        Self::OngoingSync,
        Self::OngoingRiskReport,
        Self::OngoingPayment,
    ];

    /// The flow named by a decoded request path (`/ongoing/access`), if any.
    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| path.strip_prefix('/') == Some(kind.name()))
    }

    /// The name policies use (`ongoing/access`), also the finX path without its slash.
    pub fn name(self) -> &'static str {
        match self {
            Self::OnetimeAccess => "onetime/access",
            Self::OnetimeIncomeReport => "onetime/income-report",
            Self::OnetimeAccountVerification => "onetime/account-verification",
            Self::OnetimeRiskReport => "onetime/risk-report",
            Self::OnetimePayment => "onetime/payment",
            Self::OngoingAccess => "ongoing/access",
            Self::OngoingSync => "ongoing/sync",
            Self::OngoingRiskReport => "ongoing/risk-report",
            Self::OngoingPayment => "ongoing/payment",
        }
    }

    /// Ongoing flows belong to a `user_id`; one-time flows to their flow id.
    pub fn is_ongoing(self) -> bool {
        self.name().starts_with("ongoing/")
    }

    /// Whether the flow ends with an authorization code to exchange (a manual sync does not).
    pub fn yields_code(self) -> bool {
        self != Self::OngoingSync
    }
}
