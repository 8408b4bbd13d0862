//! Data type catalogue: the data types with their time shapes, operations and scope
//! families, the scopes, and the RPCs with the scopes each of them accepts.

use super::{
    CLOUD_PLATFORM_SCOPE, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, RPC_PREFIX, SCOPE_FAMILIES,
    SCOPE_PREFIX, SESSION_PAGE_SIZE,
};

/// The time shape of a data type's points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `sampleTime{physicalTime, utcOffset, civilTime}`.
    Sample,
    /// `interval{startTime, startUtcOffset, endTime, endUtcOffset, civilStartTime, civilEndTime}`.
    Interval,
    /// A session `interval` (same fields).
    Session,
    /// `date{year, month, day}`.
    Daily,
    /// No time (food, roll-up-only types).
    Untimed,
}

pub(super) const OP_LIST: u8 = 1;
pub(super) const OP_GET: u8 = 2;
pub(super) const OP_RECONCILE: u8 = 4;
const OP_ROLLUP: u8 = 8;
pub(super) const OP_DAILY_ROLLUP: u8 = 16;
const OP_WRITE: u8 = 32;
const L_RC: u8 = OP_LIST | OP_RECONCILE;
const L_RC_RU: u8 = OP_LIST | OP_RECONCILE | OP_ROLLUP | OP_DAILY_ROLLUP;

/// A data type of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataType {
    /// Kebab-case id used in URLs and notifications (`heart-rate`).
    pub id: &'static str,
    /// camelCase union key in a DataPoint (`heartRate`).
    pub key: &'static str,
    /// Time shape.
    pub shape: Shape,
    ops: u8,
    /// Scope family that grants reading it.
    pub family: &'static str,
    /// Whether subscribers may name it (Google sends no webhooks for ECG, IRN, total-calories).
    pub webhook: bool,
}

const ACT: &str = "activity_and_fitness";
const HM: &str = "health_metrics_and_measurements";

const fn dt(
    id: &'static str,
    key: &'static str,
    shape: Shape,
    ops: u8,
    family: &'static str,
) -> DataType {
    DataType {
        id,
        key,
        shape,
        ops,
        family,
        webhook: true,
    }
}

const fn no_webhook(mut t: DataType) -> DataType {
    t.webhook = false;
    t
}

/// Data types: ids and operations from `data-types.json`, shapes from the Discovery document,
/// scope families from the Scopes page.
pub const DATA_TYPES: &[DataType] = &[
    dt(
        "active-energy-burned",
        "activeEnergyBurned",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "active-minutes",
        "activeMinutes",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "active-zone-minutes",
        "activeZoneMinutes",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "activity-level",
        "activityLevel",
        Shape::Interval,
        L_RC,
        ACT,
    ),
    dt("altitude", "altitude", Shape::Interval, L_RC_RU, ACT),
    dt(
        "basal-energy-burned",
        "basalEnergyBurned",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "blood-glucose",
        "bloodGlucose",
        Shape::Sample,
        L_RC_RU | OP_GET,
        HM,
    ),
    dt(
        "body-fat",
        "bodyFat",
        Shape::Sample,
        L_RC_RU | OP_GET | OP_WRITE,
        HM,
    ),
    dt(
        "calories-in-heart-rate-zone",
        "caloriesInHeartRateZone",
        Shape::Untimed,
        OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    ),
    dt(
        "core-body-temperature",
        "coreBodyTemperature",
        Shape::Sample,
        L_RC_RU | OP_GET,
        HM,
    ),
    dt(
        "daily-heart-rate-variability",
        "dailyHeartRateVariability",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-heart-rate-zones",
        "dailyHeartRateZones",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-oxygen-saturation",
        "dailyOxygenSaturation",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-respiratory-rate",
        "dailyRespiratoryRate",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-resting-heart-rate",
        "dailyRestingHeartRate",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt(
        "daily-sleep-temperature-derivations",
        "dailySleepTemperatureDerivations",
        Shape::Daily,
        L_RC,
        HM,
    ),
    dt("daily-vo2-max", "dailyVo2Max", Shape::Daily, L_RC, ACT),
    dt("distance", "distance", Shape::Interval, L_RC_RU, ACT),
    no_webhook(dt(
        "electrocardiogram",
        "electrocardiogram",
        Shape::Session,
        OP_LIST,
        "ecg",
    )),
    dt(
        "exercise",
        "exercise",
        Shape::Session,
        L_RC | OP_GET | OP_WRITE,
        ACT,
    ),
    dt(
        "floors",
        "floors",
        Shape::Interval,
        OP_RECONCILE | OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    ),
    dt(
        "food",
        "food",
        Shape::Untimed,
        OP_LIST | OP_GET,
        "nutrition",
    ),
    dt(
        "food-measurement-unit",
        "foodMeasurementUnit",
        Shape::Untimed,
        OP_LIST | OP_GET,
        "nutrition",
    ),
    dt("heart-rate", "heartRate", Shape::Sample, L_RC_RU, HM),
    dt(
        "heart-rate-variability",
        "heartRateVariability",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt(
        "height",
        "height",
        Shape::Sample,
        L_RC | OP_GET | OP_WRITE,
        HM,
    ),
    dt(
        "hydration-log",
        "hydrationLog",
        Shape::Session,
        L_RC_RU | OP_GET | OP_WRITE,
        "nutrition",
    ),
    no_webhook(dt(
        "irregular-rhythm-notification",
        "irregularRhythmNotification",
        Shape::Session,
        OP_LIST,
        "irn",
    )),
    dt(
        "menstrual-period",
        "menstrualPeriod",
        Shape::Interval,
        OP_WRITE,
        "reproductive_health",
    ),
    dt("moods", "moods", Shape::Sample, OP_WRITE, "mindfulness"),
    dt(
        "nutrition-log",
        "nutritionLog",
        Shape::Session,
        L_RC_RU | OP_GET | OP_WRITE,
        "nutrition",
    ),
    dt(
        "ovulation-test",
        "ovulationTest",
        Shape::Sample,
        OP_WRITE,
        "reproductive_health",
    ),
    dt(
        "oxygen-saturation",
        "oxygenSaturation",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt(
        "respiratory-rate-sleep-summary",
        "respiratoryRateSleepSummary",
        Shape::Sample,
        L_RC,
        HM,
    ),
    dt("run-vo2-max", "runVo2Max", Shape::Sample, L_RC_RU, ACT),
    dt(
        "sedentary-period",
        "sedentaryPeriod",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "sleep",
        "sleep",
        Shape::Session,
        L_RC | OP_GET | OP_WRITE,
        "sleep",
    ),
    dt("steps", "steps", Shape::Interval, L_RC_RU, ACT),
    dt(
        "swim-lengths-data",
        "swimLengthsData",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    dt(
        "symptoms",
        "symptoms",
        Shape::Sample,
        OP_WRITE,
        "logged_symptoms",
    ),
    dt(
        "time-in-heart-rate-zone",
        "timeInHeartRateZone",
        Shape::Interval,
        L_RC_RU,
        ACT,
    ),
    no_webhook(dt(
        "total-calories",
        "totalCalories",
        Shape::Untimed,
        OP_ROLLUP | OP_DAILY_ROLLUP,
        ACT,
    )),
    dt("vo2-max", "vo2Max", Shape::Sample, L_RC, ACT),
    dt(
        "weight",
        "weight",
        Shape::Sample,
        L_RC_RU | OP_GET | OP_WRITE,
        HM,
    ),
];

impl DataType {
    /// The type by its kebab-case id (exact).
    pub fn by_id(id: &str) -> Option<&'static Self> {
        DATA_TYPES.iter().find(|t| t.id == id)
    }

    /// The snake_case name used in filters (`heart_rate`).
    pub fn filter_name(&self) -> String {
        self.id.replace('-', "_")
    }

    pub(super) fn supports(&self, op: u8) -> bool {
        self.ops & op != 0
    }

    pub(super) fn page_limits(&self) -> (usize, usize) {
        if matches!(self.id, "sleep" | "exercise") {
            (SESSION_PAGE_SIZE, SESSION_PAGE_SIZE)
        } else {
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        }
    }
}

/// Full URL of a scope from its short form (`sleep.readonly`); full URLs and the OpenID scopes
/// pass unchanged.
pub fn scope_url(s: &str) -> String {
    let known_short = SCOPE_FAMILIES.iter().any(|f| {
        s == *f
            || s.strip_prefix(f)
                .is_some_and(|r| r == ".readonly" || r == ".writeonly")
    });
    if known_short {
        format!("{SCOPE_PREFIX}{s}")
    } else if s == "cloud-platform" {
        CLOUD_PLATFORM_SCOPE.to_owned()
    } else {
        s.to_owned()
    }
}

pub(super) fn is_known_scope(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix(SCOPE_PREFIX) {
        let family = rest
            .strip_suffix(".readonly")
            .or_else(|| rest.strip_suffix(".writeonly"))
            .unwrap_or(rest);
        return SCOPE_FAMILIES.contains(&family);
    }
    matches!(
        s,
        CLOUD_PLATFORM_SCOPE
            | "openid"
            | "email"
            | "profile"
            | "https://www.googleapis.com/auth/userinfo.email"
            | "https://www.googleapis.com/auth/userinfo.profile"
    )
}

/// Whether `scopes` allow reading data of `family` (`.readonly` or the legacy suffix-less scope).
pub(super) fn reads_family(scopes: &[String], family: &str) -> bool {
    scopes.iter().any(|s| {
        s.strip_prefix(SCOPE_PREFIX)
            .is_some_and(|r| r == family || r.strip_suffix(".readonly") == Some(family))
    })
}

fn writes_family(scopes: &[String], family: &str) -> bool {
    scopes.iter().any(|s| {
        s.strip_prefix(SCOPE_PREFIX)
            .is_some_and(|r| r == family || r.strip_suffix(".writeonly") == Some(family))
    })
}

/// An RPC of the API: its name (for error metadata) and the scopes any one of which it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rpc {
    List,
    Reconcile,
    Get,
    DailyRollUp,
    Unimplemented(&'static str),
    Identity,
    CreateSubscriber,
    ListSubscribers,
    DeleteSubscriber,
}

impl Rpc {
    pub(super) fn name(self) -> String {
        let short = match self {
            Self::List => "DataPointsService.ListDataPoints",
            Self::Reconcile => "DataPointsService.ReconcileDataPoints",
            Self::Get => "DataPointsService.GetDataPoint",
            Self::DailyRollUp => "DataPointsService.DailyRollUpDataPoints",
            Self::Unimplemented(n) => n,
            Self::Identity => "HealthProfileService.GetIdentity",
            Self::CreateSubscriber => "DataSubscriptionService.CreateSubscriber",
            Self::ListSubscribers => "DataSubscriptionService.ListSubscribers",
            Self::DeleteSubscriber => "DataSubscriptionService.DeleteSubscriber",
        };
        format!("{RPC_PREFIX}{short}")
    }

    /// Method-level scope check (Google's front end): any one read scope of these families
    /// (for reconcile also a write scope of the write families).
    pub(super) fn accepts(self, scopes: &[String]) -> bool {
        let read: &[&str] = match self {
            Self::List => &[ACT, "ecg", HM, "irn", "location", "nutrition", "sleep"],
            Self::Reconcile | Self::Get | Self::DailyRollUp | Self::Unimplemented(_) => {
                &[ACT, HM, "location", "nutrition", "sleep"]
            }
            Self::Identity => &[
                ACT,
                "ecg",
                HM,
                "irn",
                "nutrition",
                "profile",
                "settings",
                "sleep",
            ],
            Self::CreateSubscriber | Self::ListSubscribers | Self::DeleteSubscriber => &[],
        };
        let write: &[&str] = match self {
            Self::Reconcile | Self::Unimplemented(_) => &[
                ACT,
                HM,
                "location",
                "logged_symptoms",
                "mindfulness",
                "nutrition",
                "reproductive_health",
                "sleep",
            ],
            _ => &[],
        };
        read.iter().any(|f| reads_family(scopes, f))
            || write.iter().any(|f| writes_family(scopes, f))
    }
}
