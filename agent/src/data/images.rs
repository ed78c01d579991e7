//! Image data: a folder of class folders (`root/CLASS/*.png|jpg`, the ImageFolder layout) or
//! a CSV manifest of `path,label`, brought to the schema's shape.
//!
//! Every image is converted to the schema's channels (grayscale or RGB), resized to its
//! height × width (bilinear), and its pixels scaled to [0, 1] in channel-major order: those
//! are the model's inputs, standardised afterwards like any other input. The label is the
//! class name — the folder or the manifest's label — looked up in the task's `class_names`;
//! an image of another class, or a file that does not decode, is an error naming the file.

use std::path::{Path, PathBuf};

use cohort_protocols::model::{DataSchema, ImageShape, Task};
use image::imageops::FilterType;

use super::{DataError, Rows};

/// Where a site's images are.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// `root/CLASS/IMAGE`.
    Folder(PathBuf),
    /// A CSV with a header and columns `path,label` (paths relative to the manifest's folder).
    Manifest(PathBuf),
}

fn err(path: &Path, error: impl std::fmt::Display) -> DataError {
    DataError::Image {
        path: path.display().to_string(),
        error: error.to_string(),
    }
}

/// The (image path, class name) pairs of a source, in a stable order.
pub fn list(source: &ImageSource) -> Result<Vec<(PathBuf, String)>, DataError> {
    let mut out = Vec::new();
    match source {
        ImageSource::Folder(root) => {
            let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
                .map_err(|e| err(root, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            classes.sort();
            for dir in classes {
                let class = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map_err(|e| err(&dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().is_some_and(|x| {
                            matches!(
                                x.to_string_lossy().to_lowercase().as_str(),
                                "png" | "jpg" | "jpeg"
                            )
                        })
                    })
                    .collect();
                files.sort();
                out.extend(files.into_iter().map(|f| (f, class.clone())));
            }
        }
        ImageSource::Manifest(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
            let base = path.parent().unwrap_or(Path::new("."));
            let mut lines = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty());
            let header = lines.next().map(|(_, l)| l.trim().to_string());
            if header.as_deref() != Some("path,label") {
                return Err(err(path, "the manifest's header must be `path,label`"));
            }
            for (i, line) in lines {
                let Some((file, label)) = line.split_once(',') else {
                    return Err(err(path, format!("line {}: expected `path,label`", i + 1)));
                };
                out.push((base.join(file.trim()), label.trim().to_string()));
            }
        }
    }
    Ok(out)
}

/// One image as model inputs: `shape.channels` planes of `height` × `width`, in [0, 1].
pub fn pixels(path: &Path, shape: &ImageShape) -> Result<Vec<f64>, DataError> {
    let img = image::open(path).map_err(|e| err(path, e))?;
    let (w, h) = (shape.width as u32, shape.height as u32);
    let mut out = Vec::with_capacity(shape.inputs());
    if shape.channels == 1 {
        let g = image::imageops::resize(&img.to_luma8(), w, h, FilterType::Triangle);
        out.extend(g.pixels().map(|p| f64::from(p.0[0]) / 255.0));
    } else {
        let rgb = image::imageops::resize(&img.to_rgb8(), w, h, FilterType::Triangle);
        for c in 0..3 {
            out.extend(rgb.pixels().map(|p| f64::from(p.0[c]) / 255.0));
        }
    }
    Ok(out)
}

/// Every image of `source` as encoded rows (class indices as labels).
pub fn load(schema: &DataSchema, source: &ImageSource) -> Result<Rows, DataError> {
    let files = list(source)?;
    if files.is_empty() {
        let where_ = match source {
            ImageSource::Folder(p) | ImageSource::Manifest(p) => p,
        };
        return Err(err(where_, "no images (png or jpg) found"));
    }
    load_files(schema, &files)
}

/// The images `list` gave, as encoded rows in the same order.
pub fn load_files(schema: &DataSchema, files: &[(PathBuf, String)]) -> Result<Rows, DataError> {
    let (Some(shape), Task::Multiclass { .. }) = (&schema.images, &schema.task) else {
        return Err(DataError::NotImages);
    };
    let names = schema.task.class_names();
    let mut rows = Rows::default();
    for (path, class) in files {
        let class = class.as_str();
        let Some(label) = names.iter().position(|n| n == class) else {
            return Err(err(
                path,
                format!("class {class:?} is not one of the task's class_names {names:?}"),
            ));
        };
        let x = pixels(path, shape)?;
        rows.features.push(x.into_iter().map(Some).collect());
        rows.labels.push(label as f64);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_images_are_resized_and_laid_out_channel_major() {
        let dir = tempfile::tempdir().expect("tmp");
        // 4 × 2, left half pure red, right half pure blue.
        let img = image::RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let path = dir.path().join("half.png");
        img.save(&path).expect("save");
        let shape = ImageShape {
            channels: 3,
            height: 1,
            width: 2,
        };
        let p = pixels(&path, &shape).expect("pixels");
        // Red plane, then green, then blue; each 1 × 2 after resizing.
        assert_eq!(p.len(), 6);
        assert!(p[0] > 0.75 && p[1] < 0.25, "red {:?}", &p[..2]);
        assert!(p[2] < 0.1 && p[3] < 0.1, "green {:?}", &p[2..4]);
        assert!(p[4] < 0.25 && p[5] > 0.75, "blue {:?}", &p[4..]);
        let gray = pixels(
            &path,
            &ImageShape {
                channels: 1,
                height: 2,
                width: 4,
            },
        )
        .expect("gray");
        assert_eq!(gray.len(), 8);
        // A file that is not an image is named.
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not a png").expect("write");
        assert!(
            pixels(&bad, &shape)
                .unwrap_err()
                .to_string()
                .contains("bad.png")
        );
    }
}
