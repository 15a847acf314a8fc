//! Phone numbers for the PSTN gateway: turning what a user types after `koe call` or `koe rate`
//! into a canonical E.164 number (`+` and digits), or into a refusal that says what to do instead.
//!
//! This module owns the [`E164`] type and its invariants, the ITU list of assigned country calling
//! codes, the table of home countries (calling code, trunk prefix, international call prefixes,
//! emergency numbers) that national and international-prefix dialling is read against, and the
//! refusal of emergency numbers and short codes.
//!
//! Decisions worth knowing before changing anything here:
//!
//! - **Length.** E.164 allows at most 15 digits after the `+`. The floor is 7 digits in all and at
//!   least 4 after the country code: the shortest numbers in service are four-digit subscriber
//!   numbers under three-digit codes (Niue +683, Tokelau +690), so nothing real is refused, while a
//!   number that lost half its digits is. Zones +1 (NANP) and +7 (Russia, Kazakhstan) are closed
//!   plans, so there exactly 10 digits must follow the country code.
//! - **Trunk prefix.** A national number must start with the home country's trunk prefix (the `0`
//!   of Japan's 090-…) where the country has one. Without it the input is as likely to be a local
//!   number missing its area code as a national number missing its `0`, and guessing would ring a
//!   stranger, so it is refused with a "did you mean" hint. The exceptions are plans where the
//!   national number has a fixed length and can never begin with the trunk digit (NANP, India):
//!   there the prefix is optional, as people there expect (`(212) 555-0100`).
//! - **A trunk prefix after the country code** (`+44 020…`) is refused with the corrected number as
//!   a hint rather than silently dropped, but only for countries in the home table whose trunk
//!   digit can never start a national number: some countries (Italy, San Marino, Côte d'Ivoire)
//!   have national numbers that really do begin with 0. The European `+44 (0)20…` notation is
//!   understood and the `(0)` dropped, except for Italy and San Marino, which keep it.
//! - **Emergency and short codes** are refused, never routed: Koe cannot give a caller's location
//!   to an emergency service and a VoIP route may not reach one at all. Short numbers dialled
//!   without `+` are matched against the home country's emergency numbers plus the global 112 and
//!   911 (all known countries' numbers when no home is set), and an E.164 number whose national
//!   part is an emergency number of that country code (`+81110`, `+1911`) is refused the same way.
//!   Anything else shorter than 7 digits without a `+`, or containing `*` or `#`, is a short code
//!   (unless it starts with 0 like a national number there, which makes it a truncated number).
//! - Countries whose dialling rules depend on carrier selection codes or are mid-transition
//!   (Brazil, Argentina, Colombia, Chile, Hungary, Israel) are left out of the home table: they can
//!   still be called with `+`, only national dialling from them is unsupported.

use std::fmt;
use std::str::FromStr;

/// Most digits after the `+`, country code included (ITU-T E.164).
pub const MAX_DIGITS: usize = 15;
/// Fewest digits after the `+`, country code included (see the module comment for why 7).
pub const MIN_DIGITS: usize = 7;
/// Fewest digits after the country code.
pub const MIN_NATIONAL_DIGITS: usize = 4;

/// Zones whose numbering plan is closed, with the length every national number has there.
const FIXED_LENGTH_ZONES: &[(&str, usize)] = &[("1", 10), ("7", 10)];

/// Country codes whose national numbers keep their leading 0 in international form (Italy's
/// +39 06…, San Marino's +378 0549…), so a `(0)` after them is part of the number.
const ZERO_KEEPING_CODES: &[&str] = &["39", "378"];

/// Emergency numbers that work (or are redirected) almost everywhere: GSM made 112 universal on
/// mobiles, and 911 is both NANP's number and redirected on many networks elsewhere.
const GLOBAL_EMERGENCY: &[&str] = &["112", "911"];

/// Country calling codes assigned by the ITU (Complement to ITU-T E.164), sorted as strings so that
/// lookups can binary-search. The set is prefix-free, so a number's code is the one entry that
/// prefixes it.
///
/// Included beyond the geographic codes: the global services still in use (800 freephone, 808
/// shared cost, 870 Inmarsat, 881 satellite systems, 882/883 international networks, 888 OCHA,
/// 979 premium rate) and 383 Kosovo. Left out: codes withdrawn or never in service (388 ETNS, 878
/// UPT, 991 ITPCS trial) and spare or reserved blocks (0, 28x, 210, 259, 384, 422, 671, 684, 693+,
/// 83, 89, 969, 978, 990, 997, 999…).
#[rustfmt::skip]
const COUNTRY_CODES: &[&str] = &[
    "1", // NANP: US, Canada and the Caribbean members
    "20", "211", "212", "213", "216", "218", //
    "220", "221", "222", "223", "224", "225", "226", "227", "228", "229", //
    "230", "231", "232", "233", "234", "235", "236", "237", "238", "239", //
    "240", "241", "242", "243", "244", "245", "246", "247", "248", "249", //
    "250", "251", "252", "253", "254", "255", "256", "257", "258", //
    "260", "261", "262", "263", "264", "265", "266", "267", "268", "269", //
    "27", "290", "291", "297", "298", "299", //
    "30", "31", "32", "33", "34", //
    "350", "351", "352", "353", "354", "355", "356", "357", "358", "359", //
    "36", //
    "370", "371", "372", "373", "374", "375", "376", "377", "378", "379", //
    "380", "381", "382", "383", "385", "386", "387", "389", //
    "39", "40", "41", "420", "421", "423", "43", "44", "45", "46", "47", "48", "49", //
    "500", "501", "502", "503", "504", "505", "506", "507", "508", "509", //
    "51", "52", "53", "54", "55", "56", "57", "58", //
    "590", "591", "592", "593", "594", "595", "596", "597", "598", "599", //
    "60", "61", "62", "63", "64", "65", "66", //
    "670", "672", "673", "674", "675", "676", "677", "678", "679", //
    "680", "681", "682", "683", "685", "686", "687", "688", "689", //
    "690", "691", "692", //
    "7", // Russia and Kazakhstan
    "800", "808", "81", "82", "84", "850", "852", "853", "855", "856", "86", //
    "870", "880", "881", "882", "883", "886", "888", //
    "90", "91", "92", "93", "94", "95", //
    "960", "961", "962", "963", "964", "965", "966", "967", "968", //
    "970", "971", "972", "973", "974", "975", "976", "977", "979", "98", //
    "992", "993", "994", "995", "996", "998",
];

/// What national and international dialling from one country looks like.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Country {
    alpha2: &'static str,
    /// Worded to follow "in", as in "in the United States".
    name: &'static str,
    calling_code: &'static str,
    /// Dialled before a national number inside the country and dropped after the country code.
    trunk: &'static str,
    /// Prefixes that lead out of the country to a country code (`010` from Japan, `011` from the
    /// US). Only ones known to be right: an unknown one is refused with a hint, never misread.
    international: &'static [&'static str],
    /// Set where every national number has this many digits and none starts with the trunk
    /// digit, which is what makes leaving the trunk prefix off unambiguous.
    optional_trunk_len: Option<usize>,
    /// Short numbers reaching police, fire, ambulance or coast guard, besides 112 and 911.
    emergency: &'static [&'static str],
}

/// Home countries, sorted by alpha-2 code.
#[rustfmt::skip]
const COUNTRIES: &[Country] = &[
    country("AE", "the United Arab Emirates", "971", "0", &["00"], None, &["997", "998", "999"]),
    country("AT", "Austria", "43", "0", &["00"], None, &["122", "133", "144"]),
    country("AU", "Australia", "61", "0", &["0011"], None, &["000", "106"]),
    country("BD", "Bangladesh", "880", "0", &["00"], None, &["999"]),
    country("BE", "Belgium", "32", "0", &["00"], None, &["100", "101"]),
    country("CA", "Canada", "1", "1", &["011"], Some(10), &[]),
    country("CH", "Switzerland", "41", "0", &["00"], None, &["117", "118", "144"]),
    country("CN", "China", "86", "0", &["00"], None, &["110", "119", "120", "122"]),
    country("CZ", "the Czech Republic", "420", "", &["00"], None, &["150", "155", "158"]),
    country("DE", "Germany", "49", "0", &["00"], None, &["110"]),
    country("DK", "Denmark", "45", "", &["00"], None, &[]),
    country("EG", "Egypt", "20", "0", &["00"], None, &["122", "123", "180"]),
    country("ES", "Spain", "34", "", &["00"], None, &["061", "062", "080", "085", "091", "092"]),
    country("FI", "Finland", "358", "0", &["00"], None, &[]),
    country("FR", "France", "33", "0", &["00"], None, &["15", "17", "18", "114"]),
    country("GB", "the United Kingdom", "44", "0", &["00"], None, &["999"]),
    country("GR", "Greece", "30", "", &["00"], None, &["100", "166", "199"]),
    country("HK", "Hong Kong", "852", "", &["001"], None, &["999"]),
    country("ID", "Indonesia", "62", "0", &["001", "007", "008"], None,
            &["110", "113", "118", "119"]),
    country("IE", "Ireland", "353", "0", &["00"], None, &["999"]),
    country("IN", "India", "91", "0", &["00"], Some(10), &["100", "101", "102", "108"]),
    country("IT", "Italy", "39", "", &["00"], None, &["113", "115", "118", "1530"]),
    country("JP", "Japan", "81", "0", &["010"], None, &["110", "118", "119"]),
    country("KR", "South Korea", "82", "0", &["001", "002", "00700"], None, &["119", "122"]),
    country("LU", "Luxembourg", "352", "", &["00"], None, &["113"]),
    country("MX", "Mexico", "52", "", &["00"], None, &[]),
    country("MY", "Malaysia", "60", "0", &["00"], None, &["999"]),
    country("NL", "the Netherlands", "31", "0", &["00"], None, &[]),
    country("NO", "Norway", "47", "", &["00"], None, &["110", "113"]),
    country("NZ", "New Zealand", "64", "0", &["00"], None, &["111"]),
    country("PH", "the Philippines", "63", "0", &["00"], None, &[]),
    country("PK", "Pakistan", "92", "0", &["00"], None, &["15", "1122"]),
    country("PL", "Poland", "48", "", &["00"], None, &["997", "998", "999"]),
    country("PT", "Portugal", "351", "", &["00"], None, &[]),
    country("RU", "Russia", "7", "8", &["810"], None, &["101", "102", "103", "104"]),
    country("SA", "Saudi Arabia", "966", "0", &["00"], None, &["997", "998", "999"]),
    country("SE", "Sweden", "46", "0", &["00"], None, &[]),
    country("SG", "Singapore", "65", "", &["001"], None, &["995", "999"]),
    country("TH", "Thailand", "66", "0", &["001"], None, &["191", "199", "1669"]),
    country("TR", "Turkey", "90", "0", &["00"], None, &["110", "155", "156"]),
    country("TW", "Taiwan", "886", "0", &["002"], None, &["110", "119"]),
    country("US", "the United States", "1", "1", &["011"], Some(10), &[]),
    country("VN", "Vietnam", "84", "0", &["00"], None, &["113", "114", "115"]),
    country("ZA", "South Africa", "27", "0", &["00"], None, &["10111", "10177"]),
];

/// Keeps the table one row per country.
const fn country(
    alpha2: &'static str,
    name: &'static str,
    calling_code: &'static str,
    trunk: &'static str,
    international: &'static [&'static str],
    optional_trunk_len: Option<usize>,
    emergency: &'static [&'static str],
) -> Country {
    Country {
        alpha2,
        name,
        calling_code,
        trunk,
        international,
        optional_trunk_len,
        emergency,
    }
}

/// Why a dialled string is not a number Koe will call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumberError {
    /// Nothing but whitespace or separators.
    Empty,
    /// A character that is neither a digit nor a separator.
    InvalidCharacter { ch: char },
    /// A `+` anywhere but the start.
    MisplacedPlus,
    /// A `+` or an international call prefix with no country code after it.
    MissingCountryCode,
    /// The digits after the `+` do not start with an assigned country calling code.
    UnknownCountryCode { digits: String },
    /// A national number, but no home country to read it against.
    NoHomeCountry { number: String },
    /// Fewer digits after the country code than any number there has.
    TooShort {
        country_code: String,
        national_digits: usize,
        min: usize,
        max: usize,
    },
    /// More digits after the country code than any number there has.
    TooLong {
        country_code: String,
        national_digits: usize,
        min: usize,
        max: usize,
    },
    /// A national number without the home country's trunk prefix.
    MissingTrunkPrefix {
        country: &'static str,
        trunk: &'static str,
        suggestion: String,
    },
    /// Starts with 0 where no national number does: most likely another country's international
    /// call prefix, or a carrier's, which Koe does not know.
    UnknownInternationalPrefix {
        number: String,
        country: &'static str,
        prefixes: &'static [&'static str],
    },
    /// A trunk prefix kept after the country code, as in `+44 020…`.
    TrunkPrefixAfterCountryCode {
        country_code: String,
        trunk: &'static str,
        suggestion: String,
    },
    /// A NANP area code that cannot exist (starts with 0 or 1, or is an N11 service code).
    InvalidAreaCode { area_code: String },
    /// An emergency number, in short or E.164 form.
    Emergency { number: String },
    /// A service or short code (`177`, `#31#`, `116 123`).
    ShortCode { code: String },
    /// Stored or received text that is not exactly `+` and digits.
    NotCanonical { input: String },
}

impl fmt::Display for NumberError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(
                f,
                "no number given: type the number to call, for example `koe call +81 3-1234-5678`"
            ),
            Self::InvalidCharacter { ch } => {
                write!(
                    f,
                    "{} cannot be part of a phone number: use digits, a leading +, and spaces, \
                     dashes, dots, slashes or parentheses between them",
                    describe_char(*ch)
                )?;
                if ch.is_alphabetic() {
                    write!(
                        f,
                        "; a number spelled with letters (like 1-800-FLOWERS) must be typed as its \
                         keypad digits"
                    )?;
                }
                Ok(())
            }
            Self::MisplacedPlus => write!(
                f,
                "a + can only come at the very start of a number, before the country code, as in \
                 +81 3-1234-5678"
            ),
            Self::MissingCountryCode => write!(
                f,
                "there is no country code after the + (or the international call prefix): add one, \
                 for example +81 for Japan, +1 for the US and Canada or +44 for the UK"
            ),
            Self::UnknownCountryCode { digits } if digits.starts_with('0') => write!(
                f,
                "no country code starts with 0: after the + comes the country code, then the \
                 number without the 0 it starts with at home (Japan's 03-1234-5678 is \
                 +81 3-1234-5678)"
            ),
            Self::UnknownCountryCode { digits } => write!(
                f,
                "+{digits}… does not start with a country calling code in use: check the digits \
                 right after the +, for example +81 for Japan, +1 for the US and Canada or +44 for \
                 the UK"
            ),
            Self::NoHomeCountry { number } => write!(
                f,
                "`{number}` has no country code, and Koe does not know which country you are \
                 calling from: set your country with `koe config set country JP` (using your own \
                 country's two-letter code), or dial +<country code> and the number, like \
                 +81 90-1234-5678"
            ),
            Self::TooShort {
                country_code,
                national_digits,
                min,
                max,
            } => {
                let needed = if min == max {
                    format!("exactly {min}")
                } else {
                    format!("at least {min}")
                };
                write!(
                    f,
                    "the number is too short: after the country code +{country_code} it has {}, \
                     but numbers there have {needed}. Check for missing digits, such as an area \
                     code",
                    plural_digits(*national_digits),
                )
            }
            Self::TooLong {
                country_code,
                national_digits,
                min,
                max,
            } => write!(
                f,
                "the number is too long: after the country code +{country_code} it has {}, but \
                 numbers there have {}. Check for an extra or repeated digit",
                plural_digits(*national_digits),
                if min == max {
                    format!("exactly {max}")
                } else {
                    format!("at most {max} ({MAX_DIGITS} in all is the international limit)")
                }
            ),
            Self::MissingTrunkPrefix {
                country,
                trunk,
                suggestion,
            } => write!(
                f,
                "in {country}, a number dialled without a country code starts with {trunk}: did \
                 you mean {suggestion}? Without the {trunk} it may be a local number missing its \
                 area code. To call another country, start with + and its country code"
            ),
            Self::UnknownInternationalPrefix {
                number,
                country,
                prefixes,
            } => write!(
                f,
                "`{number}` starts with 0 in a way no number in {country} does. For an \
                 international call, write + and the country code instead, like \
                 +44 20 7946 0000 (from {country} Koe also understands {})",
                prefixes.join(" or ")
            ),
            Self::TrunkPrefixAfterCountryCode {
                country_code,
                trunk,
                suggestion,
            } => write!(
                f,
                "after +{country_code}, leave out the {trunk} that the number starts with when \
                 dialled inside the country: did you mean {suggestion}?"
            ),
            Self::InvalidAreaCode { area_code } => write!(
                f,
                "{area_code} is not a possible area code under +1: North American area codes \
                 start with 2 to 9 and never end in 11 (N11 codes such as 911 are service \
                 numbers). Check the three digits after the +1"
            ),
            Self::Emergency { number } => write!(
                f,
                "Koe cannot place emergency calls, and `{number}` is an emergency number. Call it \
                 from a mobile or landline phone, which can reach the emergency service and give \
                 it your location"
            ),
            Self::ShortCode { code } => write!(
                f,
                "`{code}` is a service or short code, and those cannot be dialled through Koe: \
                 they only work inside a phone network. Dial a full number with + and the country \
                 code instead, like +81 3-1234-5678"
            ),
            Self::NotCanonical { input } => write!(
                f,
                "{input:?} is not a phone number in canonical form (+ followed by {MIN_DIGITS} to \
                 {MAX_DIGITS} digits and nothing else)"
            ),
        }
    }
}

impl std::error::Error for NumberError {}

/// Why a country setting was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountryError {
    /// Not two ASCII letters at all.
    NotTwoLetters { input: String },
    /// Two letters, but not a country in Koe's table.
    Unknown { code: String },
}

impl fmt::Display for CountryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotTwoLetters { input } => write!(
                f,
                "{input:?} is not a country code: use your country's two-letter ISO 3166 code, \
                 such as JP, US or GB. Koe knows: {}",
                known_codes()
            ),
            Self::Unknown { code } => {
                // UK is the one code people reach for that ISO 3166 does not use.
                let hint = if code == "UK" {
                    " (the United Kingdom's code is GB)"
                } else {
                    ""
                };
                write!(
                    f,
                    "Koe does not know the country code {code}{hint}: use a two-letter ISO 3166 \
                     code from this list: {}",
                    known_codes()
                )
            }
        }
    }
}

impl std::error::Error for CountryError {}

/// A phone number in E.164 form: `+`, a country calling code in use, and a national number, 7 to
/// 15 digits in all, never an emergency number. Only this module builds one, so holding one is
/// proof that every check here passed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct E164(String);

impl E164 {
    /// Reads the canonical form only (`+` and digits, nothing else), for numbers coming back from
    /// storage or over the wire. Everything `parse_dialled` checks is checked again, because a
    /// stored or received number is only as trustworthy as whoever wrote it.
    ///
    /// # Errors
    ///
    /// [`NumberError::NotCanonical`] for anything but `+` and ASCII digits, otherwise the same
    /// refusals as [`parse_dialled`].
    pub fn parse_canonical(text: &str) -> Result<Self, NumberError> {
        match text.strip_prefix('+') {
            Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                international(digits, 0, None, text)
            }
            _ => Err(NumberError::NotCanonical {
                input: text.to_owned(),
            }),
        }
    }

    /// The canonical text, `+` included.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without the `+`: what rate tables and SIP URIs are keyed on.
    pub fn digits(&self) -> &str {
        self.0.strip_prefix('+').unwrap_or(&self.0)
    }

    /// The country calling code the number starts with.
    pub fn country_code(&self) -> &str {
        split_country_code(self.digits()).map_or("", |(code, _)| code)
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The country the user dials from, which gives national numbers and international call prefixes
/// their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HomeCountry(&'static Country);

impl HomeCountry {
    /// Reads an ISO 3166 alpha-2 code, in any case, with surrounding whitespace ignored.
    ///
    /// # Errors
    ///
    /// [`CountryError`] when the text is not two letters or not a country in Koe's table.
    pub fn parse(text: &str) -> Result<Self, CountryError> {
        let code = text.trim();
        if code.chars().count() != 2 || !code.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(CountryError::NotTwoLetters {
                input: code.to_owned(),
            });
        }
        let code = code.to_ascii_uppercase();
        COUNTRIES
            .iter()
            .find(|c| c.alpha2 == code)
            .map(HomeCountry)
            .ok_or(CountryError::Unknown { code })
    }

    /// Every country Koe can read national numbers for, by alpha-2 code.
    pub fn all() -> impl Iterator<Item = HomeCountry> {
        COUNTRIES.iter().map(HomeCountry)
    }

    /// The ISO 3166 alpha-2 code, upper case.
    pub fn alpha2(&self) -> &'static str {
        self.0.alpha2
    }

    /// The English name, worded to follow "in" ("the United States").
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// The country calling code, without `+`.
    pub fn calling_code(&self) -> &'static str {
        self.0.calling_code
    }

    /// The national trunk prefix, empty where the country has none.
    pub fn trunk_prefix(&self) -> &'static str {
        self.0.trunk
    }

    /// The international call prefixes Koe understands from this country.
    pub fn international_prefixes(&self) -> &'static [&'static str] {
        self.0.international
    }

    /// The country's own emergency numbers; 112 and 911 are refused everywhere besides these.
    pub fn emergency_numbers(&self) -> &'static [&'static str] {
        self.0.emergency
    }
}

impl FromStr for HomeCountry {
    type Err = CountryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for HomeCountry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.alpha2)
    }
}

/// Reads a number as a person types it: `+` and a country code in any common punctuation, a
/// national number or one behind an international call prefix of `home`, or a refusal.
///
/// # Errors
///
/// A [`NumberError`] variant per reason, each worded to tell the user what to dial instead.
pub fn parse_dialled(input: &str, home: Option<&HomeCountry>) -> Result<E164, NumberError> {
    let typed = input.trim();
    let scanned = scan(typed)?;
    if scanned.plus {
        if let Some(ch) = scanned.service {
            return Err(NumberError::InvalidCharacter { ch });
        }
        return international(&scanned.digits, 0, scanned.zero_group_at, typed);
    }
    if scanned.service.is_some() {
        return Err(NumberError::ShortCode {
            code: typed.to_owned(),
        });
    }
    if scanned.digits.is_empty() {
        return Err(NumberError::Empty);
    }
    let digits = scanned.digits.as_str();
    if is_short_emergency(digits, home.map(|h| h.0)) {
        return Err(NumberError::Emergency {
            number: typed.to_owned(),
        });
    }
    let Some(home) = home.map(|h| h.0) else {
        if digits.len() < MIN_DIGITS {
            return Err(NumberError::ShortCode {
                code: typed.to_owned(),
            });
        }
        return Err(NumberError::NoHomeCountry {
            number: typed.to_owned(),
        });
    };
    let prefix = home
        .international
        .iter()
        .filter(|p| digits.starts_with(**p))
        .max_by_key(|p| p.len());
    if let Some(prefix) = prefix {
        let rest = digits.get(prefix.len()..).unwrap_or("");
        return international(rest, prefix.len(), scanned.zero_group_at, typed);
    }
    // A short string that begins like a national number is a truncated number, and saying "too
    // short" helps more than calling it a service code.
    let looks_national =
        digits.starts_with('0') && (home.trunk == "0" || keeps_zero(home.calling_code));
    if digits.len() < MIN_DIGITS && !looks_national {
        return Err(NumberError::ShortCode {
            code: typed.to_owned(),
        });
    }
    national(home, digits, typed)
}

/// What a typed string holds once separators are dropped.
struct Scanned {
    plus: bool,
    /// ASCII digits only.
    digits: String,
    /// The first `*` or `#`: these only ever appear in service codes.
    service: Option<char>,
    /// Where a `(0)` group's digit landed in `digits`: the European way of writing a trunk
    /// prefix that is dropped in international dialling.
    zero_group_at: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Digit(char),
    Plus,
    Open,
    Close,
    Separator,
    Service(char),
}

fn scan(typed: &str) -> Result<Scanned, NumberError> {
    // Numbers copied from web pages and phone apps arrive as tel: links.
    let body = match typed.get(..4) {
        Some(scheme) if scheme.eq_ignore_ascii_case("tel:") => typed.get(4..).unwrap_or(""),
        _ => typed,
    };
    let tokens = body
        .chars()
        .map(|c| classify(c).ok_or(NumberError::InvalidCharacter { ch: c }))
        .collect::<Result<Vec<Token>, NumberError>>()?;
    let mut scanned = Scanned {
        plus: false,
        digits: String::new(),
        service: None,
        zero_group_at: None,
    };
    for (i, token) in tokens.iter().enumerate() {
        match *token {
            Token::Digit(d) => scanned.digits.push(d),
            Token::Plus => {
                if scanned.plus || !scanned.digits.is_empty() || scanned.service.is_some() {
                    return Err(NumberError::MisplacedPlus);
                }
                scanned.plus = true;
            }
            Token::Open => {
                let zero_group = tokens.get(i + 1) == Some(&Token::Digit('0'))
                    && tokens.get(i + 2) == Some(&Token::Close);
                if zero_group && scanned.zero_group_at.is_none() {
                    scanned.zero_group_at = Some(scanned.digits.len());
                }
            }
            Token::Close | Token::Separator => {}
            Token::Service(c) => {
                scanned.service.get_or_insert(c);
            }
        }
    }
    Ok(scanned)
}

fn classify(c: char) -> Option<Token> {
    // Japanese, Arabic and Hindi input methods produce their own digits and punctuation; a
    // number typed that way is the same number.
    const DIGIT_BLOCKS: [u32; 5] = ['0' as u32, 0xFF10, 0x0660, 0x06F0, 0x0966];
    for base in DIGIT_BLOCKS {
        if let Some(offset) = (c as u32).checked_sub(base) {
            if offset < 10 {
                return char::from_digit(offset, 10).map(Token::Digit);
            }
        }
    }
    let token = match c {
        '+' | '\u{FF0B}' => Token::Plus,
        '(' | '\u{FF08}' => Token::Open,
        ')' | '\u{FF09}' => Token::Close,
        '*' | '#' | '\u{FF0A}' | '\u{FF03}' => Token::Service(c),
        '-'
        | '.'
        | '/'
        | '\u{2010}'..='\u{2015}'
        | '\u{2212}'
        | '\u{30FC}'
        | '\u{FF0D}'
        | '\u{FF0E}'
        | '\u{FF0F}' => Token::Separator,
        // Invisible direction marks and zero-width characters come along when a number is
        // copied out of a contact card or chat app.
        '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}' => Token::Separator,
        c if c.is_whitespace() => Token::Separator,
        _ => return None,
    };
    Some(token)
}

/// Reads `digits` as a country code and national number, the form after `+` or an international
/// call prefix. `offset` is where `digits` starts in the scanned digits, to place a `(0)` group.
fn international(
    digits: &str,
    offset: usize,
    zero_group_at: Option<usize>,
    typed: &str,
) -> Result<E164, NumberError> {
    if digits.is_empty() {
        return Err(NumberError::MissingCountryCode);
    }
    let Some((code, mut national)) = split_country_code(digits) else {
        let shown = digits.get(..3).unwrap_or(digits);
        return Err(NumberError::UnknownCountryCode {
            digits: shown.to_owned(),
        });
    };
    if zero_group_at == Some(offset + code.len()) && !keeps_zero(code) {
        national = national.strip_prefix('0').unwrap_or(national);
    }
    finalize(code, national, typed)
}

/// Reads a national number dialled inside `home`.
fn national(home: &'static Country, digits: &str, typed: &str) -> Result<E164, NumberError> {
    let trunk = home.trunk;
    let national = match home.optional_trunk_len {
        Some(len) if digits.len() == len && !digits.starts_with('0') => digits,
        _ if !trunk.is_empty() && digits.starts_with(trunk) => {
            digits.get(trunk.len()..).unwrap_or("")
        }
        _ if trunk.is_empty() || home.optional_trunk_len.is_some() => digits,
        _ => {
            return Err(NumberError::MissingTrunkPrefix {
                country: home.name,
                trunk,
                suggestion: format!("{trunk}{digits}"),
            })
        }
    };
    if national.starts_with('0') && !keeps_zero(home.calling_code) {
        return Err(NumberError::UnknownInternationalPrefix {
            number: typed.to_owned(),
            country: home.name,
            prefixes: home.international,
        });
    }
    // India's +91 is not a closed zone like +1, so its fixed length is only known here, where
    // the number was dialled from India.
    if let Some(len) = home.optional_trunk_len {
        let country_code = home.calling_code.to_owned();
        let national_digits = national.len();
        if national_digits < len {
            return Err(NumberError::TooShort {
                country_code,
                national_digits,
                min: len,
                max: len,
            });
        }
        if national_digits > len {
            return Err(NumberError::TooLong {
                country_code,
                national_digits,
                min: len,
                max: len,
            });
        }
    }
    finalize(home.calling_code, national, typed)
}

/// The checks every number passes, however it was written, before it becomes an `E164`.
fn finalize(code: &str, national: &str, typed: &str) -> Result<E164, NumberError> {
    if is_emergency_under(code, national) {
        return Err(NumberError::Emergency {
            number: typed.to_owned(),
        });
    }
    for country in COUNTRIES.iter().filter(|c| c.calling_code == code) {
        let trunk = country.trunk;
        // A leading 0 can only be a misplaced trunk prefix where 0 is the trunk prefix; other
        // trunk digits begin real national numbers (Russia's 8 800…), so there only the length
        // tells them apart.
        let misplaced = !trunk.is_empty()
            && national.len() > trunk.len()
            && national.starts_with(trunk)
            && (trunk == "0"
                || country.optional_trunk_len.or(fixed_zone_length(code))
                    == Some(national.len() - trunk.len()));
        if misplaced {
            let rest = national.get(trunk.len()..).unwrap_or("");
            return Err(NumberError::TrunkPrefixAfterCountryCode {
                country_code: code.to_owned(),
                trunk,
                suggestion: format!("+{code}{rest}"),
            });
        }
    }
    let (min, max) = match fixed_zone_length(code) {
        Some(len) => (len, len),
        None => (
            MIN_NATIONAL_DIGITS.max(MIN_DIGITS.saturating_sub(code.len())),
            MAX_DIGITS.saturating_sub(code.len()),
        ),
    };
    let national_digits = national.len();
    if national_digits < min {
        return Err(NumberError::TooShort {
            country_code: code.to_owned(),
            national_digits,
            min,
            max,
        });
    }
    if national_digits > max {
        return Err(NumberError::TooLong {
            country_code: code.to_owned(),
            national_digits,
            min,
            max,
        });
    }
    if code == "1" {
        let area_code = national.get(..3).unwrap_or(national);
        if area_code.starts_with(['0', '1']) || area_code.ends_with("11") {
            return Err(NumberError::InvalidAreaCode {
                area_code: area_code.to_owned(),
            });
        }
    }
    Ok(E164(format!("+{code}{national}")))
}

/// Splits digits into an assigned country code and the rest.
fn split_country_code(digits: &str) -> Option<(&str, &str)> {
    (1..=3).find_map(|len| {
        let code = digits.get(..len)?;
        if code.len() == len && COUNTRY_CODES.binary_search(&code).is_ok() {
            Some((code, digits.get(len..).unwrap_or("")))
        } else {
            None
        }
    })
}

fn fixed_zone_length(code: &str) -> Option<usize> {
    FIXED_LENGTH_ZONES
        .iter()
        .find(|(zone, _)| *zone == code)
        .map(|(_, len)| *len)
}

fn keeps_zero(code: &str) -> bool {
    ZERO_KEEPING_CODES.contains(&code)
}

/// Whether `national` is an emergency number under `code`.
fn is_emergency_under(code: &str, national: &str) -> bool {
    GLOBAL_EMERGENCY.contains(&national)
        || COUNTRIES
            .iter()
            .filter(|c| c.calling_code == code)
            .any(|c| c.emergency.contains(&national))
}

/// Whether digits dialled without `+` are an emergency number. Without a home country, every
/// country's numbers count: telling someone who dialled 119 that Koe cannot reach emergency
/// services matters more than knowing which country they meant.
fn is_short_emergency(digits: &str, home: Option<&'static Country>) -> bool {
    if GLOBAL_EMERGENCY.contains(&digits) {
        return true;
    }
    match home {
        None => COUNTRIES.iter().any(|c| c.emergency.contains(&digits)),
        Some(home) => {
            // "1-911" from the US is still 911.
            let without_trunk = if home.trunk.is_empty() {
                None
            } else {
                digits.strip_prefix(home.trunk)
            };
            [Some(digits), without_trunk]
                .into_iter()
                .flatten()
                .any(|d| GLOBAL_EMERGENCY.contains(&d) || home.emergency.contains(&d))
        }
    }
}

fn known_codes() -> String {
    COUNTRIES
        .iter()
        .map(|c| c.alpha2)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_char(ch: char) -> String {
    if ch.is_ascii_graphic() {
        format!("`{ch}`")
    } else if ch.is_control() || ch.is_whitespace() {
        format!("the invisible character U+{:04X}", u32::from(ch))
    } else {
        format!("`{ch}` (U+{:04X})", u32::from(ch))
    }
}

fn plural_digits(n: usize) -> String {
    if n == 1 {
        "1 digit".to_owned()
    } else {
        format!("{n} digits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(code: &str) -> HomeCountry {
        HomeCountry::parse(code).unwrap()
    }

    fn dial(input: &str, country: Option<&str>) -> Result<E164, NumberError> {
        let home = country.map(home);
        parse_dialled(input, home.as_ref())
    }

    fn ok(input: &str, country: Option<&str>) -> String {
        match dial(input, country) {
            Ok(number) => number.as_str().to_owned(),
            Err(err) => panic!("{input:?} from {country:?} was refused: {err}"),
        }
    }

    fn suggestion(error: &NumberError) -> Option<&str> {
        match error {
            NumberError::MissingTrunkPrefix { suggestion, .. }
            | NumberError::TrunkPrefixAfterCountryCode { suggestion, .. } => Some(suggestion),
            _ => None,
        }
    }

    fn err(input: &str, country: Option<&str>) -> NumberError {
        match dial(input, country) {
            Ok(number) => panic!("{input:?} from {country:?} was accepted as {number}"),
            Err(err) => err,
        }
    }

    #[test]
    fn international_format_needs_no_home_country() {
        for (input, want) in [
            ("+81312345678", "+81312345678"),
            ("+81 3-1234-5678", "+81312345678"),
            ("+1 (212) 555-0100", "+12125550100"),
            ("+1.212.555.0100", "+12125550100"),
            ("+44 20 7946 0000", "+442079460000"),
            ("+49 30/1234567", "+49301234567"),
            ("+33 1 23 45 67 89", "+33123456789"),
            ("+39 06 1234 5678", "+390612345678"),
            ("+7 800 123-45-67", "+78001234567"),
            ("+683 4002", "+6834002"),
            ("  +81 90 1234 5678  ", "+819012345678"),
        ] {
            assert_eq!(ok(input, None), want, "{input}");
            assert_eq!(ok(input, Some("DE")), want, "{input} with a home country");
        }
    }

    #[test]
    fn national_format_with_home_country() {
        for (country, input, want) in [
            ("JP", "090-1234-5678", "+819012345678"),
            ("JP", "03-1234-5678", "+81312345678"),
            ("JP", "0120-123-456", "+81120123456"),
            ("US", "(212) 555-0100", "+12125550100"),
            ("US", "1 212 555 0100", "+12125550100"),
            ("US", "1-212-555-0100", "+12125550100"),
            ("US", "212.555.0100", "+12125550100"),
            ("CA", "(416) 555-0100", "+14165550100"),
            ("GB", "020 7946 0000", "+442079460000"),
            ("DE", "030/1234567", "+49301234567"),
            ("FR", "01 23 45 67 89", "+33123456789"),
            ("IT", "06 1234 5678", "+390612345678"),
            ("IT", "312 345 6789", "+393123456789"),
            ("ES", "912 345 678", "+34912345678"),
            ("RU", "8 (495) 123-45-67", "+74951234567"),
            ("RU", "8 800 123 45 67", "+78001234567"),
            ("IN", "98765 43210", "+919876543210"),
            ("IN", "098765 43210", "+919876543210"),
            ("IN", "011 2345 6789", "+911123456789"),
            ("HK", "2123 4567", "+85221234567"),
            ("AU", "02 9876 5432", "+61298765432"),
            ("KR", "010-1234-5678", "+821012345678"),
            ("TW", "02 2345 6789", "+886223456789"),
        ] {
            assert_eq!(ok(input, Some(country)), want, "{input} from {country}");
        }
    }

    #[test]
    fn international_call_prefix_of_home_country() {
        for (country, input, want) in [
            ("JP", "010 44 20 7946 0000", "+442079460000"),
            ("JP", "010-1-212-555-0100", "+12125550100"),
            ("JP", "010 39 06 1234 5678", "+390612345678"),
            ("DE", "00 44 20 7946 0000", "+442079460000"),
            ("GB", "0049 30 1234567", "+49301234567"),
            ("US", "011 81 3 1234 5678", "+81312345678"),
            ("AU", "0011 1 212 555 0100", "+12125550100"),
            ("KR", "00700 81 3 1234 5678", "+81312345678"),
            ("KR", "001 81 3 1234 5678", "+81312345678"),
            ("RU", "8 10 49 30 1234567", "+49301234567"),
            ("IT", "00 1 212 555 0100", "+12125550100"),
            ("SG", "001 81 3 1234 5678", "+81312345678"),
        ] {
            assert_eq!(ok(input, Some(country)), want, "{input} from {country}");
        }
    }

    #[test]
    fn bracketed_trunk_zero_is_dropped_except_where_it_belongs() {
        assert_eq!(ok("+44 (0)20 7946 0000", None), "+442079460000");
        assert_eq!(ok("+49 (0)30 1234567", None), "+49301234567");
        assert_eq!(ok("00 44 (0)20 7946 0000", Some("DE")), "+442079460000");
        assert_eq!(ok("+39 (0)6 1234 5678", None), "+390612345678");
        // Only right after the country code does (0) mean a trunk prefix.
        assert_eq!(ok("+1 (212) 555-0100", None), "+12125550100");
    }

    #[test]
    fn other_scripts_and_pasted_text() {
        assert_eq!(ok("＋８１ ９０－１２３４－５６７８", None), "+819012345678");
        assert_eq!(
            ok("０９０ー１２３４ー５６７８", Some("JP")),
            "+819012345678"
        );
        assert_eq!(ok("（０３）１２３４－５６７８", Some("JP")), "+81312345678");
        assert_eq!(
            ok("\u{202A}+81 90 1234 5678\u{202C}", None),
            "+819012345678"
        );
        assert_eq!(
            ok("+81\u{a0}90\u{2011}1234\u{2011}5678", None),
            "+819012345678"
        );
        assert_eq!(ok("tel:+1-212-555-0100", None), "+12125550100");
        assert_eq!(ok("TEL:+1-212-555-0100", None), "+12125550100");
        assert_eq!(ok("+٩٧١ ٤ ١٢٣ ٤٥٦٧", None), "+97141234567");
    }

    #[test]
    fn empty() {
        for input in ["", "   ", "()", " - . "] {
            assert_eq!(err(input, Some("JP")), NumberError::Empty, "{input:?}");
            assert_eq!(err(input, None), NumberError::Empty, "{input:?}");
        }
        assert!(NumberError::Empty.to_string().contains("koe call +81"));
    }

    #[test]
    fn invalid_characters_are_named() {
        assert_eq!(
            err("+81 90 1234 567x", None),
            NumberError::InvalidCharacter { ch: 'x' }
        );
        assert_eq!(
            err("+81312345678,123", None),
            NumberError::InvalidCharacter { ch: ',' }
        );
        assert_eq!(
            err("090\t1234\u{0}5678", Some("JP")),
            NumberError::InvalidCharacter { ch: '\u{0}' }
        );
        assert_eq!(
            err("+81*90", None),
            NumberError::InvalidCharacter { ch: '*' }
        );
        let letters = err("1-800-FLOWERS", Some("US"));
        assert_eq!(letters, NumberError::InvalidCharacter { ch: 'F' });
        let message = letters.to_string();
        assert!(message.contains("`F`"), "{message}");
        assert!(message.contains("keypad digits"), "{message}");
        let invisible = NumberError::InvalidCharacter { ch: '\u{7}' }.to_string();
        assert!(invisible.contains("U+0007"), "{invisible}");
        let kanji = err("110番", Some("JP")).to_string();
        assert!(kanji.contains("`番` (U+756A)"), "{kanji}");
    }

    #[test]
    fn plus_only_at_the_start() {
        assert_eq!(err("81+90 1234 5678", None), NumberError::MisplacedPlus);
        assert_eq!(err("++81 90 1234 5678", None), NumberError::MisplacedPlus);
        assert!(NumberError::MisplacedPlus.to_string().contains("start"));
    }

    #[test]
    fn missing_country_code() {
        assert_eq!(err("+", None), NumberError::MissingCountryCode);
        assert_eq!(err("+ ()", None), NumberError::MissingCountryCode);
        assert_eq!(err("010", Some("JP")), NumberError::MissingCountryCode);
        assert!(NumberError::MissingCountryCode
            .to_string()
            .contains("+81 for Japan"));
    }

    #[test]
    fn unknown_country_codes() {
        assert_eq!(
            err("+999 1234 5678", None),
            NumberError::UnknownCountryCode {
                digits: "999".into()
            }
        );
        for input in [
            "+28 1234 5678",
            "+388 1234 5678",
            "+878 1234 5678",
            "+991 1234 5678",
        ] {
            assert!(
                matches!(err(input, None), NumberError::UnknownCountryCode { .. }),
                "{input}"
            );
        }
        let message = err("+999 1234 5678", None).to_string();
        assert!(
            message.contains("+999…") && message.contains("+81 for Japan"),
            "{message}"
        );
        let zero = err("+090 1234 5678", None);
        assert_eq!(
            zero,
            NumberError::UnknownCountryCode {
                digits: "090".into()
            }
        );
        assert!(zero.to_string().contains("+81 3-1234-5678"), "{zero}");
        assert!(matches!(
            err("010 999 1234 5678", Some("JP")),
            NumberError::UnknownCountryCode { .. }
        ));
    }

    #[test]
    fn national_number_without_home_country() {
        let error = err("090-1234-5678", None);
        assert_eq!(
            error,
            NumberError::NoHomeCountry {
                number: "090-1234-5678".into()
            }
        );
        let message = error.to_string();
        assert!(message.contains("`koe config set country JP`"), "{message}");
        assert!(message.contains("+<country code>"), "{message}");
        assert!(matches!(
            err("00 44 20 7946 0000", None),
            NumberError::NoHomeCountry { .. }
        ));
    }

    #[test]
    fn too_long() {
        let error = err("+81 90 1234 5678 9012", None);
        assert_eq!(
            error,
            NumberError::TooLong {
                country_code: "81".into(),
                national_digits: 14,
                min: 5,
                max: 13
            }
        );
        assert!(
            error.to_string().contains("extra or repeated digit"),
            "{error}"
        );
        assert!(error.to_string().contains("at most 13"), "{error}");
        let nanp = err("+1 212 555 01000", None);
        assert!(
            matches!(
                nanp,
                NumberError::TooLong {
                    max: 10,
                    national_digits: 11,
                    ..
                }
            ),
            "{nanp:?}"
        );
        assert!(nanp.to_string().contains("exactly 10"), "{nanp}");
        assert!(matches!(
            err("98765 432100", Some("IN")),
            NumberError::TooLong { max: 10, .. }
        ));
        assert!(matches!(
            err("090 1234 5678 9012 3456", Some("JP")),
            NumberError::TooLong { .. }
        ));
    }

    #[test]
    fn too_short() {
        let error = err("+81 90 12", None);
        assert_eq!(
            error,
            NumberError::TooShort {
                country_code: "81".into(),
                national_digits: 4,
                min: 5,
                max: 13
            }
        );
        assert!(error.to_string().contains("at least 5"), "{error}");
        assert!(error.to_string().contains("missing digits"), "{error}");
        assert!(matches!(
            err("+683 123", None),
            NumberError::TooShort { min: 4, .. }
        ));
        let local = err("555-0100", Some("US"));
        assert!(
            matches!(
                local,
                NumberError::TooShort {
                    min: 10,
                    national_digits: 7,
                    ..
                }
            ),
            "{local:?}"
        );
        assert!(local.to_string().contains("exactly 10"), "{local}");
        assert!(local.to_string().contains("area code"), "{local}");
        assert!(matches!(
            err("2345 6789", Some("IN")),
            NumberError::TooShort { min: 10, .. }
        ));
        assert!(matches!(
            err("8 495 123 45 6", Some("RU")),
            NumberError::TooShort { min: 10, .. }
        ));
        assert!(matches!(
            err("0120", Some("JP")),
            NumberError::TooShort { .. }
        ));
        assert!(matches!(err("+81 177", None), NumberError::TooShort { .. }));
        let one = NumberError::TooShort {
            country_code: "81".into(),
            national_digits: 1,
            min: 5,
            max: 13,
        };
        assert!(one.to_string().contains("has 1 digit,"), "{one}");
    }

    #[test]
    fn national_number_needs_the_trunk_prefix() {
        let error = err("90-1234-5678", Some("JP"));
        assert_eq!(
            error,
            NumberError::MissingTrunkPrefix {
                country: "Japan",
                trunk: "0",
                suggestion: "09012345678".into()
            }
        );
        let message = error.to_string();
        assert!(message.contains("did you mean 09012345678?"), "{message}");
        assert!(message.contains("+ and its country code"), "{message}");
        assert!(matches!(
            err("20 7946 0000", Some("GB")),
            NumberError::MissingTrunkPrefix { .. }
        ));
        let russia = err("495 123 45 67", Some("RU"));
        assert_eq!(suggestion(&russia), Some("84951234567"), "{russia:?}");
    }

    #[test]
    fn unknown_international_prefix() {
        let error = err("00 44 20 7946 0000", Some("US"));
        assert!(matches!(
            error,
            NumberError::UnknownInternationalPrefix {
                country: "the United States",
                ..
            }
        ));
        let message = error.to_string();
        assert!(
            message.contains("011") && message.contains("+44 20 7946 0000"),
            "{message}"
        );
        // A carrier's own prefix (NTT's 0033) is refused rather than read as a Japanese number.
        assert!(matches!(
            err("0033 010 44 20 7946 0000", Some("JP")),
            NumberError::UnknownInternationalPrefix { .. }
        ));
        assert!(matches!(
            err("009 44 20 7946 0000", Some("TW")),
            NumberError::UnknownInternationalPrefix { .. }
        ));
        assert!(matches!(
            err("0123456789", Some("IN")),
            NumberError::TooShort { .. }
        ));
    }

    #[test]
    fn trunk_prefix_after_country_code() {
        let error = err("+44 020 7946 0000", None);
        assert_eq!(
            error,
            NumberError::TrunkPrefixAfterCountryCode {
                country_code: "44".into(),
                trunk: "0",
                suggestion: "+442079460000".into()
            }
        );
        assert!(
            error.to_string().contains("did you mean +442079460000?"),
            "{error}"
        );
        for (input, want) in [
            ("+81 090 1234 5678", "+819012345678"),
            ("+1 1 212 555 0100", "+12125550100"),
            ("+7 8 495 123 45 67", "+74951234567"),
        ] {
            let error = err(input, None);
            assert!(
                matches!(error, NumberError::TrunkPrefixAfterCountryCode { .. }),
                "{input}: {error:?}"
            );
            assert_eq!(suggestion(&error), Some(want), "{input}");
        }
        // Where national numbers really begin with 0 it stays.
        assert_eq!(ok("+225 07 12 34 56 78", None), "+2250712345678");
        assert_eq!(ok("+39 06 1234 5678", None), "+390612345678");
    }

    #[test]
    fn impossible_nanp_area_codes() {
        assert_eq!(
            err("+1 123 555 0100", None),
            NumberError::InvalidAreaCode {
                area_code: "123".into()
            }
        );
        assert_eq!(
            err("+1 911 555 0100", None),
            NumberError::InvalidAreaCode {
                area_code: "911".into()
            }
        );
        assert!(matches!(
            err("(021) 555-0100", Some("US")),
            NumberError::UnknownInternationalPrefix { .. }
        ));
        assert!(err("+1 023 555 0100", None)
            .to_string()
            .contains("start with 2 to 9"));
    }

    #[test]
    fn emergency_numbers_dialled_short() {
        for (country, number) in [
            ("JP", "110"),
            ("JP", "118"),
            ("JP", "119"),
            ("JP", "112"),
            ("US", "911"),
            ("US", "1-911"),
            ("CA", "911"),
            ("GB", "999"),
            ("GB", "112"),
            ("DE", "110"),
            ("AU", "000"),
            ("NZ", "111"),
            ("IN", "100"),
            ("IN", "101"),
            ("IN", "102"),
            ("FR", "15"),
            ("FR", "17"),
            ("FR", "18"),
            ("IT", "113"),
            ("ES", "091"),
            ("CN", "120"),
            ("SG", "995"),
            ("ZA", "10111"),
            ("RU", "103"),
            ("MX", "911"),
            ("KR", "112"),
        ] {
            assert_eq!(
                err(number, Some(country)),
                NumberError::Emergency {
                    number: number.into()
                },
                "{number} from {country}"
            );
        }
        for number in ["112", "911", "119", "999", "000"] {
            assert_eq!(
                err(number, None),
                NumberError::Emergency {
                    number: number.into()
                }
            );
        }
    }

    #[test]
    fn emergency_numbers_in_e164_form() {
        for input in [
            "+81110",
            "+81 119",
            "+1911",
            "+1 911",
            "+44999",
            "+44 112",
            "+61 000",
            "+33 15",
            "+39 113",
            "+49 112",
            "+7 112",
            "+27 10111",
            "+86 120",
            "+353 999",
        ] {
            assert_eq!(
                err(input, None),
                NumberError::Emergency {
                    number: input.into()
                },
                "{input}"
            );
            assert_eq!(
                E164::parse_canonical(&input.replace(' ', "")),
                Err(NumberError::Emergency {
                    number: input.replace(' ', "")
                }),
                "{input} as stored"
            );
        }
        // Trunk zero and emergency number together still reach the emergency check.
        assert!(matches!(
            err("0110", Some("JP")),
            NumberError::Emergency { .. }
        ));
        assert!(matches!(
            err("010 81 110", Some("JP")),
            NumberError::Emergency { .. }
        ));
    }

    #[test]
    fn emergency_message_says_to_use_a_phone() {
        let message = err("119", Some("JP")).to_string();
        assert!(
            message.contains("Koe cannot place emergency calls"),
            "{message}"
        );
        assert!(message.contains("`119`"), "{message}");
        assert!(message.contains("mobile or landline phone"), "{message}");
    }

    #[test]
    fn short_and_service_codes() {
        for (country, input) in [
            (Some("JP"), "177"),
            (Some("JP"), "#31#"),
            (Some("JP"), "*#06#"),
            (Some("US"), "*67 212 555 0100"),
            (Some("US"), "411"),
            (Some("GB"), "116 123"),
            (Some("GB"), "118 118"),
            (Some("ES"), "016"),
            (Some("AU"), "13 22 21"),
            (None, "177"),
            (None, "#31#"),
        ] {
            assert_eq!(
                err(input, country),
                NumberError::ShortCode { code: input.into() },
                "{input} from {country:?}"
            );
        }
        let message = err("177", Some("JP")).to_string();
        assert!(
            message.contains("cannot be dialled through Koe"),
            "{message}"
        );
    }

    #[test]
    fn canonical_form() {
        let number = E164::parse_canonical("+819012345678").unwrap();
        assert_eq!(number.as_str(), "+819012345678");
        assert_eq!(number.digits(), "819012345678");
        assert_eq!(number.country_code(), "81");
        assert_eq!(number.to_string(), "+819012345678");
        assert_eq!(
            E164::parse_canonical("+12125550100")
                .unwrap()
                .country_code(),
            "1"
        );
        assert_eq!(
            E164::parse_canonical("+8613812345678")
                .unwrap()
                .country_code(),
            "86"
        );
        assert_eq!(
            E164::parse_canonical("+353871234567")
                .unwrap()
                .country_code(),
            "353"
        );
        for input in [
            "+81 90 1234 5678",
            "819012345678",
            "",
            "+",
            "++819012345678",
            "+８１９０１２３４５６７８",
            "+819012345678\n",
            " +819012345678",
            "tel:+819012345678",
        ] {
            assert_eq!(
                E164::parse_canonical(input),
                Err(NumberError::NotCanonical {
                    input: input.into()
                }),
                "{input:?}"
            );
        }
        assert!(NumberError::NotCanonical { input: "x".into() }
            .to_string()
            .contains("canonical"));
        assert!(matches!(
            E164::parse_canonical("+9991234567"),
            Err(NumberError::UnknownCountryCode { .. })
        ));
        assert!(matches!(
            E164::parse_canonical("+8190123456789012"),
            Err(NumberError::TooLong { .. })
        ));
        assert!(matches!(
            E164::parse_canonical("+81901"),
            Err(NumberError::TooShort { .. })
        ));
        assert!(matches!(
            E164::parse_canonical("+4402079460000"),
            Err(NumberError::TrunkPrefixAfterCountryCode { .. })
        ));
    }

    #[test]
    fn home_country_parsing() {
        for input in ["JP", "jp", "Jp", " jP\n"] {
            assert_eq!(home(input).alpha2(), "JP");
        }
        let japan = home("jp");
        assert_eq!(japan.calling_code(), "81");
        assert_eq!(japan.trunk_prefix(), "0");
        assert_eq!(japan.international_prefixes(), &["010"]);
        assert_eq!(japan.emergency_numbers(), &["110", "118", "119"]);
        assert_eq!(japan.name(), "Japan");
        assert_eq!(japan.to_string(), "JP");
        assert_eq!("us".parse::<HomeCountry>().unwrap().calling_code(), "1");
        assert_eq!(home("IT").trunk_prefix(), "");

        let unknown = HomeCountry::parse("xx").unwrap_err();
        assert_eq!(unknown, CountryError::Unknown { code: "XX".into() });
        let message = unknown.to_string();
        assert!(
            message.contains("two-letter") && message.contains("JP, KR"),
            "{message}"
        );

        let uk = HomeCountry::parse("uk").unwrap_err().to_string();
        assert!(uk.contains("code is GB"), "{uk}");

        for input in ["", "J", "JPN", "Japan", "J1", "日本", "éé"] {
            let error = HomeCountry::parse(input).unwrap_err();
            assert!(
                matches!(error, CountryError::NotTwoLetters { .. }),
                "{input:?}"
            );
            assert!(
                error.to_string().contains("two-letter ISO 3166 code"),
                "{error}"
            );
        }
    }

    #[test]
    fn country_table_is_consistent() {
        assert!(COUNTRIES.len() >= 30);
        assert_eq!(HomeCountry::all().count(), COUNTRIES.len());
        let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        for pair in COUNTRIES.windows(2) {
            assert!(
                pair[0].alpha2 < pair[1].alpha2,
                "{} before {}",
                pair[0].alpha2,
                pair[1].alpha2
            );
        }
        for c in COUNTRIES {
            assert!(c.alpha2.len() == 2 && c.alpha2.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(!c.name.is_empty());
            assert!(COUNTRY_CODES.contains(&c.calling_code), "{}", c.alpha2);
            assert!(c.trunk.is_empty() || is_digits(c.trunk), "{}", c.alpha2);
            assert!(!c.international.is_empty(), "{}", c.alpha2);
            for prefix in c.international {
                assert!(is_digits(prefix), "{} {prefix}", c.alpha2);
            }
            for number in c.emergency {
                assert!(
                    is_digits(number) && number.len() < MIN_DIGITS,
                    "{} {number}",
                    c.alpha2
                );
                assert!(
                    !GLOBAL_EMERGENCY.contains(number),
                    "{} lists {number} twice",
                    c.alpha2
                );
            }
            // An optional trunk prefix is only unambiguous if no national number starts with it.
            if c.optional_trunk_len.is_some() {
                assert_eq!(c.trunk.len(), 1, "{}", c.alpha2);
            }
            assert_eq!(
                HomeCountry::parse(c.alpha2).map(|h| h.alpha2()),
                Ok(c.alpha2)
            );
        }
    }

    #[test]
    fn country_code_table_is_sorted_and_prefix_free() {
        for pair in COUNTRY_CODES.windows(2) {
            assert!(pair[0] < pair[1], "{} before {}", pair[0], pair[1]);
        }
        for code in COUNTRY_CODES {
            assert!((1..=3).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit()));
            for other in COUNTRY_CODES {
                assert!(
                    code == other || !other.starts_with(code),
                    "{code} prefixes {other}"
                );
            }
        }
        for code in [
            "1", "7", "20", "27", "44", "81", "86", "211", "383", "886", "998", "979",
        ] {
            assert!(COUNTRY_CODES.contains(&code), "{code}");
        }
        for code in [
            "0", "28", "210", "259", "384", "388", "422", "671", "684", "693", "878", "969", "991",
            "999",
        ] {
            assert!(!COUNTRY_CODES.contains(&code), "{code}");
        }
        // The one-digit zones 1 and 7, and the two-digit codes of zones 2 to 9.
        let by_length = |len: usize| COUNTRY_CODES.iter().filter(|c| c.len() == len).count();
        assert_eq!((by_length(1), by_length(2)), (2, 44));
    }

    /// A tiny xorshift so the fuzz loop is reproducible without a dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    fn assert_canonical(number: &E164, input: &str, country: Option<&HomeCountry>) {
        let text = number.as_str();
        let digits = text
            .strip_prefix('+')
            .unwrap_or_else(|| panic!("{input:?} gave {text:?}"));
        assert!(
            digits.bytes().all(|b| b.is_ascii_digit()),
            "{input:?} gave {text:?}"
        );
        assert!(
            (MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()),
            "{input:?} gave {text:?}"
        );
        assert_eq!(number.digits(), digits);
        assert!(digits.starts_with(number.country_code()) && !number.country_code().is_empty());
        assert_eq!(
            E164::parse_canonical(text).as_ref(),
            Ok(number),
            "{input:?} from {country:?}"
        );
        assert_eq!(
            parse_dialled(text, None).as_ref(),
            Ok(number),
            "{input:?} from {country:?}"
        );
    }

    #[test]
    fn fuzz_random_strings_never_panic_and_ok_is_canonical() {
        const PIECES: &[&str] = &[
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "1", "8", "9", " ", "-", ".",
            "(", ")", "/", "+", "*", "#", "(0)", "00", "010", "011", "0011", "810", "x", "F", ",",
            "０", "９", "＋", "ー", "\u{202A}", "\u{a0}", "é", "\u{0}", "番", "٣", "tel:", "\n",
        ];
        let homes: Vec<Option<HomeCountry>> = std::iter::once(None)
            .chain(HomeCountry::all().map(Some))
            .collect();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = rng.below(24);
            let input: String = (0..len).map(|_| *rng.pick(PIECES)).collect();
            let country = *rng.pick(&homes);
            match parse_dialled(&input, country.as_ref()) {
                Ok(number) => {
                    accepted += 1;
                    assert_canonical(&number, &input, country.as_ref());
                }
                Err(error) => assert!(!error.to_string().is_empty()),
            }
            if let Ok(number) = E164::parse_canonical(&input) {
                assert_canonical(&number, &input, None);
            }
        }
        assert!(accepted > 0);
    }

    #[test]
    fn fuzz_plausible_numbers_never_panic_and_ok_is_canonical() {
        const SEPARATORS: &[&str] = &["", "", " ", "-", ".", " (0)", "/", "\u{3000}"];
        let homes: Vec<HomeCountry> = HomeCountry::all().collect();
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let country = *rng.pick(&homes);
            let start = match rng.below(4) {
                0 => format!("+{}", rng.pick(COUNTRY_CODES)),
                1 => format!(
                    "{}{}",
                    rng.pick(country.international_prefixes()),
                    rng.pick(COUNTRY_CODES)
                ),
                2 => country.trunk_prefix().to_owned(),
                _ => String::new(),
            };
            let mut input = start;
            for _ in 0..rng.below(16) {
                let separator = *rng.pick(SEPARATORS);
                input.push_str(separator);
                input.push(char::from(b'0' + rng.below(10) as u8));
            }
            let home = if rng.below(8) == 0 {
                None
            } else {
                Some(country)
            };
            match parse_dialled(&input, home.as_ref()) {
                Ok(number) => {
                    accepted += 1;
                    assert_canonical(&number, &input, home.as_ref());
                }
                Err(error) => assert!(!error.to_string().is_empty()),
            }
        }
        // The generator is meant to reach the accepting paths, not only the refusals.
        assert!(accepted > 3_000, "only {accepted} accepted");
    }
}
