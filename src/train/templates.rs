//! Prompt templates for Textual Inversion training.
//!
//! Templates use AUTOMATIC1111's placeholders: `[name]` becomes the placeholder
//! token(s) and `[filewords]` the image's caption. The diffusers/Gal et al. lists
//! use Python's `{}`; every template we ingest has `{}` rewritten to `[name]`, so
//! both styles work everywhere (a literal `{}` cannot appear in a prompt).
//!
//! Licensing: the two `imagenet_*_templates_small` lists are copied verbatim from
//! diffusers' `examples/textual_inversion/textual_inversion.py` (Apache-2.0),
//! which took them from Gal et al.'s textual_inversion repository (MIT).
//! A1111's `textual_inversion_templates/*.txt` are AGPL-3.0 and are *not*
//! included; the `*_filewords` and `name_only` builtins here are our own lists,
//! and A1111's files can still be used by loading them with
//! [`TemplateSet::from_file`].

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::rng::Rng;

/// Errors from loading template lists.
#[derive(Debug, Error)]
pub enum PromptError {
    /// The template file could not be read.
    #[error("{}: cannot read template file: {source}", path.display())]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The template file is not UTF-8 text.
    #[error("{}: template file is not valid UTF-8 text", path.display())]
    NotUtf8 {
        /// File that failed.
        path: PathBuf,
    },
    /// No template left after dropping blank lines.
    #[error("{origin}: no templates (every line is blank)")]
    Empty {
        /// File name or description of the list.
        origin: String,
    },
    /// An unknown builtin template-set name.
    #[error(
        "unknown template set '{name}' (object, style, object_filewords, style_filewords, name_only)"
    )]
    UnknownBuiltin {
        /// The name as given.
        name: String,
    },
}

/// `imagenet_templates_small` from diffusers' Textual Inversion example (object).
pub const IMAGENET_TEMPLATES_SMALL: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// `imagenet_style_templates_small` from diffusers' Textual Inversion example (style).
pub const IMAGENET_STYLE_TEMPLATES_SMALL: &[&str] = &[
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// Our own object list with captions (stands in for A1111's `subject_filewords.txt`).
const OBJECT_FILEWORDS: &[&str] = &[
    "a photo of a [name], [filewords]",
    "a rendering of a [name], [filewords]",
    "a cropped photo of the [name], [filewords]",
    "a close-up photo of a [name], [filewords]",
    "a bright photo of the [name], [filewords]",
    "a dark photo of the [name], [filewords]",
    "a good photo of the [name], [filewords]",
    "a photo of one [name], [filewords]",
    "a rendition of the [name], [filewords]",
    "a photo of the small [name], [filewords]",
    "a photo of the large [name], [filewords]",
    "[name], [filewords]",
];

/// Our own style list with captions (stands in for A1111's `style_filewords.txt`).
const STYLE_FILEWORDS: &[&str] = &[
    "a painting of [filewords], in the style of [name]",
    "a rendering of [filewords], in the style of [name]",
    "a cropped painting of [filewords], in the style of [name]",
    "a close-up painting of [filewords], in the style of [name]",
    "a picture of [filewords], in the style of [name]",
    "a bright painting of [filewords], in the style of [name]",
    "a dark painting of [filewords], in the style of [name]",
    "a good painting of [filewords], in the style of [name]",
    "[filewords], art by [name]",
    "[filewords], [name] style",
];

/// Builtin template sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// diffusers `imagenet_templates_small` (`learnable_property=object`, the default).
    Object,
    /// diffusers `imagenet_style_templates_small` (`learnable_property=style`).
    Style,
    /// Object prompts that also carry the caption.
    ObjectFilewords,
    /// Style prompts that also carry the caption.
    StyleFilewords,
    /// Just the placeholder.
    NameOnly,
}

impl Builtin {
    /// Parses a builtin name. A1111's file names `subject`, `style`,
    /// `subject_filewords`, `style_filewords` (with or without `.txt`) are accepted
    /// as aliases for our equivalents; `none` is not (load A1111's file for that).
    pub fn from_name(name: &str) -> Result<Self, PromptError> {
        match name.trim().trim_end_matches(".txt") {
            "object" | "subject" => Ok(Builtin::Object),
            "style" => Ok(Builtin::Style),
            "object_filewords" | "subject_filewords" => Ok(Builtin::ObjectFilewords),
            "style_filewords" => Ok(Builtin::StyleFilewords),
            "name_only" => Ok(Builtin::NameOnly),
            _ => Err(PromptError::UnknownBuiltin {
                name: name.to_string(),
            }),
        }
    }

    fn lines(self) -> &'static [&'static str] {
        match self {
            Builtin::Object => IMAGENET_TEMPLATES_SMALL,
            Builtin::Style => IMAGENET_STYLE_TEMPLATES_SMALL,
            Builtin::ObjectFilewords => OBJECT_FILEWORDS,
            Builtin::StyleFilewords => STYLE_FILEWORDS,
            Builtin::NameOnly => &["[name]"],
        }
    }
}

/// A non-empty list of prompt templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSet {
    templates: Vec<String>,
}

impl TemplateSet {
    /// A builtin list.
    pub fn builtin(which: Builtin) -> Self {
        TemplateSet {
            templates: which.lines().iter().map(|t| normalise(t)).collect(),
        }
    }

    /// A custom list; entries are trimmed and blank ones dropped, `{}` means `[name]`.
    pub fn custom<I, S>(templates: I) -> Result<Self, PromptError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let templates: Vec<String> = templates
            .into_iter()
            .map(|t| normalise(t.as_ref().trim()))
            .filter(|t| !t.is_empty())
            .collect();
        if templates.is_empty() {
            return Err(PromptError::Empty {
                origin: "custom template list".to_string(),
            });
        }
        Ok(TemplateSet { templates })
    }

    /// Template text in A1111's file format: one template per line, lines trimmed,
    /// blank lines ignored. `origin` names the source in errors.
    pub fn from_text(text: &str, origin: &str) -> Result<Self, PromptError> {
        Self::custom(text.lines()).map_err(|_| PromptError::Empty {
            origin: origin.to_string(),
        })
    }

    /// Loads an A1111-style template file (e.g. `textual_inversion_templates/style_filewords.txt`).
    pub fn from_file(path: &Path) -> Result<Self, PromptError> {
        let bytes =
            crate::io::read::read_bounded(path, &crate::io::read::TEMPLATE_FILE).map_err(|e| {
                PromptError::Io {
                    path: path.to_path_buf(),
                    source: e.into_reason(),
                }
            })?;
        let text = String::from_utf8(bytes).map_err(|_| PromptError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        // A BOM from Windows editors would otherwise end up in the first prompt.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Self::from_text(text, &path.display().to_string())
    }

    /// The templates (normalised to `[name]` placeholders).
    pub fn templates(&self) -> &[String] {
        &self.templates
    }

    /// Whether any template uses `[filewords]` (i.e. captions matter).
    pub fn uses_filewords(&self) -> bool {
        self.templates.iter().any(|t| t.contains("[filewords]"))
    }

    /// Templates that never mention `[name]`; training on them teaches the
    /// embedding nothing, so callers may want to warn.
    pub fn templates_without_name(&self) -> Vec<&str> {
        self.templates
            .iter()
            .filter(|t| !t.contains("[name]"))
            .map(String::as_str)
            .collect()
    }

    /// Picks a template uniformly and fills it in.
    ///
    /// Substitution order follows A1111's `create_text`: `[filewords]` first,
    /// then `[name]`. A missing caption fills `[filewords]` with nothing, and the
    /// result's whitespace is collapsed (CLIP's tokenizer does the same, so this
    /// only tidies logs).
    pub fn choose(&self, rng: &mut Rng, placeholder: &str, filewords: Option<&str>) -> String {
        let i = rng.uniform_usize(self.templates.len());
        // `templates` is never empty (constructors reject that), but stay total.
        let template = self.templates.get(i).map_or("[name]", String::as_str);
        fill(template, placeholder, filewords)
    }
}

/// `{}` → `[name]`, so diffusers-style and A1111-style lists are interchangeable.
fn normalise(t: &str) -> String {
    t.replace("{}", "[name]")
}

/// Fills one template (see [`TemplateSet::choose`]).
pub fn fill(template: &str, placeholder: &str, filewords: Option<&str>) -> String {
    let text = template
        .replace("[filewords]", filewords.unwrap_or("").trim())
        .replace("[name]", placeholder);
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn builtin_lists_are_the_reference_lists() {
        assert_eq!(IMAGENET_TEMPLATES_SMALL.len(), 27);
        assert_eq!(IMAGENET_STYLE_TEMPLATES_SMALL.len(), 19);
        assert_eq!(IMAGENET_TEMPLATES_SMALL[0], "a photo of a {}");
        assert_eq!(IMAGENET_TEMPLATES_SMALL[26], "a photo of a small {}");
        assert_eq!(
            IMAGENET_STYLE_TEMPLATES_SMALL[18],
            "a large painting in the style of {}"
        );
        for b in [
            Builtin::Object,
            Builtin::Style,
            Builtin::ObjectFilewords,
            Builtin::StyleFilewords,
            Builtin::NameOnly,
        ] {
            let set = TemplateSet::builtin(b);
            assert!(set.templates_without_name().is_empty(), "{b:?}");
            assert!(set.templates().iter().all(|t| !t.contains("{}")));
            assert_eq!(
                set.uses_filewords(),
                matches!(b, Builtin::ObjectFilewords | Builtin::StyleFilewords)
            );
        }
    }

    #[test]
    fn choose_fills_in_and_covers_every_template() {
        let set = TemplateSet::builtin(Builtin::Object);
        let mut rng = Rng::new(11);
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let p = set.choose(&mut rng, "<cat-toy>", None);
            assert!(p.contains("<cat-toy>"), "{p}");
            assert!(!p.contains("[name]") && !p.contains("{}"));
            seen.insert(p);
        }
        assert_eq!(seen.len(), 27);
        assert!(seen.contains("a photo of a <cat-toy>"));
    }

    #[test]
    fn choose_is_deterministic_for_a_seed() {
        let set = TemplateSet::builtin(Builtin::Style);
        let a: Vec<String> = {
            let mut r = Rng::new(3);
            (0..20).map(|_| set.choose(&mut r, "*", None)).collect()
        };
        let b: Vec<String> = {
            let mut r = Rng::new(3);
            (0..20).map(|_| set.choose(&mut r, "*", None)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn filewords_substitution_follows_a1111_order() {
        assert_eq!(
            fill("a photo of [name], [filewords]", "emb", Some("red car ")),
            "a photo of emb, red car"
        );
        // [filewords] is replaced first, so a caption mentioning [name] gets the token.
        assert_eq!(
            fill("[filewords]", "emb", Some("a [name] toy")),
            "a emb toy"
        );
        assert_eq!(
            fill("[filewords], art by [name]", "emb", None),
            ", art by emb"
        );
        assert_eq!(fill("  a  [name]\t photo ", "x", None), "a x photo");
    }

    #[test]
    fn template_files_and_custom_lists() {
        let dir = std::env::temp_dir().join(format!("sdti_prompts_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("my_style.txt");
        std::fs::write(
            &path,
            "\u{feff}a painting of [filewords], by [name]\n\n   \n[name] style  \r\n",
        )
        .unwrap();
        let set = TemplateSet::from_file(&path).unwrap();
        assert_eq!(
            set.templates(),
            ["a painting of [filewords], by [name]", "[name] style"]
        );
        assert!(set.uses_filewords());

        std::fs::write(&path, "\n  \n").unwrap();
        let err = TemplateSet::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("my_style.txt") && err.contains("no templates"),
            "{err}"
        );

        std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            TemplateSet::from_file(&path),
            Err(PromptError::NotUtf8 { .. })
        ));
        let missing = dir.join("missing.txt");
        let err = TemplateSet::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let custom = TemplateSet::custom(["photo of {}", "", "[name] on a table"]).unwrap();
        assert_eq!(custom.templates(), ["photo of [name]", "[name] on a table"]);
        assert!(TemplateSet::custom(Vec::<String>::new()).is_err());
        let no_name = TemplateSet::custom(["picture"]).unwrap();
        assert_eq!(no_name.templates_without_name(), ["picture"]);
    }

    #[test]
    fn builtin_names() {
        assert_eq!(Builtin::from_name("subject").unwrap(), Builtin::Object);
        assert_eq!(
            Builtin::from_name("style_filewords.txt").unwrap(),
            Builtin::StyleFilewords
        );
        assert_eq!(Builtin::from_name("name_only").unwrap(), Builtin::NameOnly);
        // A1111's none.txt has no [name] at all; we do not pretend to be it.
        assert!(Builtin::from_name("none").is_err());
        let err = Builtin::from_name("hypernet").unwrap_err().to_string();
        assert!(err.contains("hypernet"), "{err}");
    }
}
