//! Recipe authoring: the sensitivity file format, the budgeted recipe search and its frontier.

pub mod recipe_search;
pub mod search_job;
pub mod sensitivity_file;
