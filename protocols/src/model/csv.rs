//! The CSV dialect sites' data comes in: a header row, then one row per example, comma
//! separated, blank lines ignored, an empty cell or `?` a missing value, every other cell a
//! finite number. Parsing lives here, beside the schema that encodes the rows, so the agent
//! (training, `predict`) and the fuzz targets read files exactly the same way.

use thiserror::Error;

/// A parsed row: `None` is a missing value.
pub type RawRow = Vec<Option<f64>>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CsvError {
    #[error("{path} is empty: it needs a header row")]
    Empty { path: String },
    #[error("{path}, line {line}, column {column:?}: {value:?} is not a number")]
    NotANumber {
        path: String,
        line: usize,
        column: String,
        value: String,
    },
}

/// The header and rows of `text` (read from `path`, named in errors). Line numbers in errors
/// count the header as line 1 and skip blank lines, as a spreadsheet shows them.
pub fn parse(path: &str, text: &str) -> Result<(Vec<String>, Vec<RawRow>), CsvError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| CsvError::Empty {
            path: path.to_string(),
        })?
        .split(',')
        .map(|c| c.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let row = line
            .split(',')
            .enumerate()
            .map(|(j, cell)| {
                let cell = cell.trim();
                if cell.is_empty() || cell == "?" {
                    return Ok(None);
                }
                cell.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(Some)
                    .ok_or_else(|| CsvError::NotANumber {
                        path: path.to_string(),
                        line: i + 2,
                        column: header.get(j).cloned().unwrap_or_else(|| format!("#{j}")),
                        value: cell.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(row);
    }
    Ok((header, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cells_blank_lines_and_bad_numbers() {
        let (h, rows) = parse("x.csv", "a, b\n1,?\n\n,2.5\n").unwrap();
        assert_eq!(h, vec!["a", "b"]);
        assert_eq!(rows, vec![vec![Some(1.0), None], vec![None, Some(2.5)]]);
        assert_eq!(
            parse("x.csv", "a,b\n1,inf\n"),
            Err(CsvError::NotANumber {
                path: "x.csv".into(),
                line: 2,
                column: "b".into(),
                value: "inf".into()
            })
        );
        assert_eq!(
            parse("x.csv", "\n \n"),
            Err(CsvError::Empty {
                path: "x.csv".into()
            })
        );
    }
}
