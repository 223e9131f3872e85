//! The callback's query string, as finX's redirect (or a service relaying it) delivers it.

use secrecy::SecretString;

/// The parameters of a callback the gateway reads; any other parameter is ignored.
///
/// `Debug` never shows the code.
#[derive(Debug, Default)]
pub struct CallbackQuery {
    /// The gateway's signed flow state.
    pub state: Option<String>,
    /// `success=true`.
    pub success: bool,
    /// finX's authorization code.
    pub code: Option<SecretString>,
    pub flow_id: Option<String>,
    pub abort: Option<String>,
    pub cancel: Option<String>,
}

/// Why a callback query was refused.
pub const REPEATED: &str = "the callback repeats a parameter";

impl CallbackQuery {
    /// Parses `application/x-www-form-urlencoded` text. A parameter the gateway reads that
    /// comes twice is refused: which of the two counts would depend on the reader.
    pub fn parse(query: &str) -> Result<Self, &'static str> {
        fn once<T>(slot: &mut Option<T>, value: T) -> Result<(), &'static str> {
            match slot.replace(value) {
                None => Ok(()),
                Some(_) => Err(REPEATED),
            }
        }
        let mut parsed = Self::default();
        let mut success = None;
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "state" => once(&mut parsed.state, value.into_owned())?,
                "success" => once(&mut success, value == "true")?,
                "code" => once(&mut parsed.code, SecretString::from(value.into_owned()))?,
                "flow_id" => once(&mut parsed.flow_id, value.into_owned())?,
                "abort" => once(&mut parsed.abort, value.into_owned())?,
                "cancel" => once(&mut parsed.cancel, value.into_owned())?,
                _ => {}
            }
        }
        parsed.success = success.unwrap_or(false);
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn reads_the_known_parameters_once() {
        let query = CallbackQuery::parse("state=s1&success=true&code=c%2B1&flow_id=f&x=1").unwrap();
        assert_eq!(query.state.as_deref(), Some("s1"));
        assert!(query.success);
        assert_eq!(query.code.as_ref().unwrap().expose_secret(), "c+1");
        assert_eq!(query.flow_id.as_deref(), Some("f"));
        assert!(!format!("{query:?}").contains("c+1"));
        assert!(!CallbackQuery::parse("success=TRUE").unwrap().success);
        for repeated in [
            "state=a&state=b",
            "code=a&code=a",
            "success=false&success=true",
        ] {
            assert_eq!(CallbackQuery::parse(repeated).unwrap_err(), REPEATED);
        }
    }
}
