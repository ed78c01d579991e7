//! `cohort-sim gen-images`: a learnable image dataset for the CNN path, generated rather than
//! downloaded (these machines reach no dataset hosts).
//!
//! Four classes of one-pixel grayscale strokes on a noisy, speckled background — `horizontal`,
//! `vertical` and `diagonal` lines and a `box` outline — at random positions, lengths and
//! intensities (as bright as the specks at worst), written
//! as PNG files in the ImageFolder layout `OUT/SITE/CLASS/N.png`, one folder per site. Sites
//! differ in their class mix (each site has one class twice as often as the others), so the
//! federation is not identically distributed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chacha20::ChaCha20Rng;
use clap::Args;
use rand_core::{Rng, SeedableRng};

pub const CLASSES: [&str; 4] = ["horizontal", "vertical", "diagonal", "box"];

#[derive(Debug, Args)]
pub struct GenArgs {
    /// Output folder: one subfolder per site, each in the ImageFolder layout.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub sites: usize,
    /// Images per site.
    #[arg(long, default_value_t = 1000)]
    pub per_site: usize,
    /// Side of the square images, in pixels.
    #[arg(long, default_value_t = 28)]
    pub size: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn uniform(rng: &mut ChaCha20Rng, lo: u32, hi: u32) -> u32 {
    lo + (rng.next_u64() % u64::from(hi - lo + 1)) as u32
}

/// One image of `class`.
pub fn draw(class: usize, size: u32, rng: &mut ChaCha20Rng) -> image::GrayImage {
    let mut img = image::GrayImage::from_fn(size, size, |_, _| {
        image::Luma([(rng.next_u64() % 110) as u8])
    });
    // Bright specks as loud as the ink, so no single pixel tells the class.
    for _ in 0..size {
        let (x, y) = (uniform(rng, 0, size - 1), uniform(rng, 0, size - 1));
        img.put_pixel(x, y, image::Luma([uniform(rng, 110, 255) as u8]));
    }
    let ink = uniform(rng, 110, 255) as u8;
    let margin = size / 7;
    let (lo, hi) = (margin, size - 1 - margin);
    let len = uniform(rng, size / 2, hi - lo);
    let start = uniform(rng, lo, hi - len);
    let at = uniform(rng, lo, hi);
    let mut put = |x: u32, y: u32| {
        if x < size && y < size {
            img.put_pixel(x, y, image::Luma([ink]));
        }
    };
    match class {
        0 => (start..start + len).for_each(|x| put(x, at)),
        1 => (start..start + len).for_each(|y| put(at, y)),
        2 => (0..len).for_each(|i| put(start + i, start + i)),
        _ => {
            let side = len.min(hi - start);
            for i in 0..=side {
                put(start + i, start);
                put(start + i, start + side);
                put(start, start + i);
                put(start + side, start + i);
            }
        }
    }
    img
}

/// Writes the dataset; returns each site's folder.
pub fn generate(args: &GenArgs) -> Result<Vec<PathBuf>> {
    let mut rng = ChaCha20Rng::seed_from_u64(args.seed);
    let mut sites = Vec::new();
    for s in 0..args.sites {
        let site = args.out.join(format!("site{}", s + 1));
        for class in CLASSES {
            std::fs::create_dir_all(site.join(class))
                .with_context(|| format!("creating {}", site.display()))?;
        }
        for n in 0..args.per_site {
            // Five draws in five: the site's favourite class twice, the others once.
            let pick = (rng.next_u64() % 5) as usize;
            let class = if pick == 4 { s % CLASSES.len() } else { pick };
            let path = site.join(CLASSES[class]).join(format!("{n:05}.png"));
            draw(class, args.size, &mut rng)
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        sites.push(site);
    }
    Ok(sites)
}

pub fn main(args: &GenArgs) -> Result<std::process::ExitCode> {
    let sites = generate(args)?;
    println!(
        "wrote {} sites × {} images of {}×{} ({}) under {}",
        sites.len(),
        args.per_site,
        args.size,
        args.size,
        CLASSES.join(", "),
        Path::new(&args.out).display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
